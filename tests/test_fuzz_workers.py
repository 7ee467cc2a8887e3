"""The protocol fuzz suite (tests/test_fuzz.py) against `recserve serve --workers 2`: the
same frames through the multi-core front end, where validation happens in worker
processes and scoring in the engine process."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from server_fixtures import RawConnection, start_serve
from test_fuzz import (  # noqa: F401  (collected here with this module's server fixture)
    MAX_FRAME,
    MODEL,
    TOKEN,
    test_concatenated_truncated_and_corrupted_frames,
    test_deep_nesting,
    test_huge_length_headers_are_refused_and_closed,
    test_ids_and_ops_of_every_type,
    test_mutated_requests,
)

from recserve.engine.repository import save_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    save_model(root, MODEL.spec, MODEL.weights, version=1)
    proc, port = start_serve(root, "--workers", "2", "--max-frame-bytes", str(MAX_FRAME),
                             "--max-candidates", "32", "--frame-timeout", "5",
                             env={**os.environ, "RECSERVE_ADMIN_TOKEN": TOKEN})
    canary = RawConnection(port)
    yield SimpleNamespace(port=port, canary=canary)
    canary.close()
    proc.kill()
    proc.wait()
    assert not [line for line in proc.log if "Traceback" in line], "".join(proc.log)
