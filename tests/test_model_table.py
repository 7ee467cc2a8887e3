"""ModelTable: swapping versions in, retiring the old ones, freeing them once drained."""

from __future__ import annotations

import pytest

from recserve.engine.model_table import ModelTable
from recserve.engine.scheduler import EngineError


def test_a_new_version_serves_at_once_and_the_old_one_goes_when_drained():
    table = ModelTable()
    table.add(("m", 1), "v1")
    table.begin(("m", 1))  # a request still running on version 1
    table.add(("m", 2), "v2")
    assert table.resolve("m") == ("m", 2) and table.models() == [("m", 2)]
    assert table[("m", 1)] == "v1"  # retired, still held for its running request
    with pytest.raises(EngineError, match="no version 1 loaded"):
        table.resolve("m", 1)
    table.end(("m", 1))
    assert table.loaded() == {("m", 2): "v2"}


def test_unload_and_unknown_names():
    table = ModelTable()
    table.add(("a", 1), "a1")
    table.add(("b", 3), "b3")
    table.unload("a")
    assert table.models() == [("b", 3)] and table.loaded() == {("b", 3): "b3"}
    with pytest.raises(EngineError, match="not loaded"):
        table.unload("a")
    with pytest.raises(EngineError, match=r"not served here; models: \['b'\]"):
        table.resolve("a")
    table.add(("b", 2), "b2")  # an older version added later still becomes the serving one
    assert table.resolve("b") == ("b", 2) and table.models() == [("b", 2)]
