"""A client in another language (Node.js, docs/clients/recserve-client.mjs), written from
PROTOCOL.md alone, scores the demo model like the Python client, and encodes the document's
worked examples byte for byte."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import start_serve

from recserve.engine.demo import build_demo_repository, demo_spec
from recserve.server import Client

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "clients" / "recserve-client.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node (Node.js 20) is not on PATH: the foreign-client test needs it")

# PROTOCOL.md section 9's infer example, as a request file for the JS client.
DOC_INPUTS = {
    "watch_history": [17, 4021, 388], "country": [42], "device": [3], "hour_of_day": [21],
    "member_dense": [0.5, -1.0, 0.0, 2.0],
    "title_id": {"values": [101, 2048], "lengths": [1, 1]},
    "genres": {"values": [3, 7, 12], "lengths": [2, 1]},
    "title_dense": [[0.5, 0.25, 1.0], [0.0, -0.5, 2.0]],
}


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """`recserve serve` as a real process on 127.0.0.1, serving the demo model."""
    repo = tmp_path_factory.mktemp("repo")
    build_demo_repository(repo)
    proc, found = start_serve(repo)
    try:
        yield found
    finally:
        proc.kill()
        proc.wait()


def run_node(*args: str) -> dict:
    """Run the JS client with ARGS; its stdout is one JSON document."""
    result = subprocess.run([NODE, str(SCRIPT), *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def python_inputs(inputs: dict) -> dict:
    """The JS client's inputs (JSON lists) as numpy arrays for the Python client."""
    dense = {feature.name for feature in demo_spec().dense}
    out = {}
    for name, value in inputs.items():
        if isinstance(value, dict):  # sparse: values, lengths (ints), weights (floats)
            out[name] = {key: np.asarray(v, np.float32 if key == "weights" else np.int64)
                         for key, v in value.items()}
        else:  # a dense vector or matrix, or a request-scope bag as a bare list of ids
            out[name] = np.asarray(value, np.float32 if name in dense else np.int64)
    return out


def python_scores(port: int, candidates: int, inputs: dict) -> np.ndarray:
    with Client("127.0.0.1", port) as client:
        return np.asarray(client.infer("demo", candidates=candidates,
                                       inputs=python_inputs(inputs)))


def check_common(out: dict, candidates: int) -> None:
    """ping, models and the malformed requests, whatever the infer inputs were."""
    assert out["ping"]["protocol"] == 1
    assert out["models"] == [{"name": "demo", "version": 1}]
    assert out["limits"]["max_candidates"] >= candidates
    assert (out["infer"]["model"], out["infer"]["version"]) == ("demo", 1)
    assert out["infer"]["shape"] == [candidates]
    assert out["pipelined_scores"] == out["infer"]["scores"]  # same request, sent pipelined
    # An id outside its table: bad_request carrying the request's id, naming the input.
    bad = out["out_of_table"]
    assert not bad["ok"] and bad["code"] == "bad_request" and isinstance(bad["id"], int)
    assert "title_id" in bad["message"]
    # A payload that is not a map: bad_request with id nil, and the connection goes on.
    assert out["not_a_map"]["code"] == "bad_request" and out["not_a_map"]["id"] is None
    assert out["ping_after"] == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_random_request_from_models_scores_like_the_python_client(port, seed):
    out = run_node("--port", str(port), "--candidates", "5", "--seed", str(seed))
    check_common(out, 5)
    inputs = out["infer"]["inputs"]
    assert set(inputs) == {"watch_history", "country", "device", "hour_of_day", "title_id",
                           "genres", "member_dense", "title_dense"}
    assert np.asarray(inputs["title_dense"]).shape == (5, 3)
    expected = python_scores(port, 5, inputs)
    np.testing.assert_allclose(out["infer"]["scores"], expected, rtol=0, atol=1e-6)


def test_request_file_from_protocol_example_scores_as_documented(port, tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"inputs": DOC_INPUTS}))
    out = run_node("--port", str(port), "--candidates", "2", "--request", str(path))
    check_common(out, 2)
    expected = python_scores(port, 2, DOC_INPUTS)
    np.testing.assert_allclose(out["infer"]["scores"], expected, rtol=0, atol=1e-6)
    # PROTOCOL.md section 9 says these two candidates score [0.61706, 0.62645].
    np.testing.assert_allclose(out["infer"]["scores"], [0.61706, 0.62645], rtol=0, atol=1e-5)


def _doc_hex_blocks() -> list[str]:
    """The hex frames of PROTOCOL.md section 9 (annotations after the hex dropped)."""
    text = (ROOT / "PROTOCOL.md").read_text()
    section = text[text.index("## 9."):text.index("## 10.")]
    blocks = []
    for body in re.findall(r"```\n(.*?)```", section, flags=re.S):
        pairs = []
        for line in body.splitlines():
            for token in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", token):
                    break
                pairs.append(token)
        if pairs:
            blocks.append("".join(pairs))
    return blocks


def test_worked_examples_encode_byte_for_byte():
    out = run_node("--examples", "1")
    assert _doc_hex_blocks() == [out["ping_request"], out["ping_response"],
                                 out["infer_request"], out["infer_response"]]
    np.testing.assert_allclose(out["infer_response_scores"], [0.61706, 0.62645], atol=1e-5)
    text = (ROOT / "PROTOCOL.md").read_text()
    typed = re.search(r"which packs to\s*`([0-9a-f ]+)`", text).group(1)
    assert typed.replace(" ", "") == out["typed_vector"]
