"""The protocol fuzz suite (tests/test_fuzz.py) against `recserve serve --workers 2`: the
same frames through the multi-core front end, where validation happens in worker
processes and scoring in the engine process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from server_fixtures import RawConnection
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "recserve.server.cli", "serve", "--port", "0", "--device",
         "cpu", "--workers", "2", "--model-repo", str(root), "--max-frame-bytes",
         str(MAX_FRAME), "--max-candidates", "32", "--frame-timeout", "5"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "RECSERVE_ADMIN_TOKEN": TOKEN})
    port, log = None, []
    for line in proc.stderr:
        log.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else port
        if port is not None and "ready: every model is loaded" in line:
            break
    else:
        pytest.fail("serve --workers 2 did not start:\n" + "".join(log))
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    canary = RawConnection(port)
    yield SimpleNamespace(port=port, canary=canary)
    canary.close()
    proc.kill()
    proc.wait()
    assert not [line for line in log if "Traceback" in line], "".join(log)
