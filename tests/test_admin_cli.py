"""``recserve load / reload / unload`` and the clients' admin methods against a real server
with an admin token and a repository of two versions (hot swap from the command line)."""

from __future__ import annotations

import asyncio

import pytest
from server_fixtures import loaded, small_spec, two_version_repo
from test_server_control import TOKEN, engine_backend, infer_message, start

from recserve.server.aclient import AsyncClient
from recserve.server.admin_cli import admin_token, describe
from recserve.server.cli import main
from recserve.server.client import Client, admin_request


@pytest.fixture
def repo(tmp_path):
    return two_version_repo(tmp_path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_the_cli_hot_swaps_versions_with_the_token_from_the_environment(repo, capsys,
                                                                        monkeypatch):
    thread = start(engine_backend(), repo, admin_token=TOKEN)
    port = str(thread.port)
    monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
    try:
        code, out, _ = run_cli(capsys, "load", "small", "--version", "1", "--port", port)
        assert code == 0 and out.startswith("small version 1 is served; loaded in ")
        with Client(port=thread.port) as client:
            request = infer_message(0, loaded(small_spec(), version=1, seed=1))
            del request["id"]  # (the client numbers its requests)
            assert client.call(**request)["version"] == 1
            code, out, _ = run_cli(capsys, "reload", "small", "--port", port)
            assert code == 0 and out.startswith("small version 2 is served (was version 1); "
                                                "reloaded in ")
            assert client.call(**request)["version"] == 2
        code, out, _ = run_cli(capsys, "unload", "small", "--port", port)
        assert (code, out) == (0, "small: version 2 unloaded")
        code, out, err = run_cli(capsys, "unload", "small", "--port", port)
        assert code == 1 and err.startswith("error: not_found")  # nothing served any more
        code, _, err = run_cli(capsys, "load", "small", "--version", "9", "--port", port)
        assert code == 1 and "not_found" in err
    finally:
        thread.stop()


def test_the_cli_reads_a_token_file_and_says_what_is_missing(repo, capsys, monkeypatch,
                                                             tmp_path):
    thread = start(engine_backend(), repo, admin_token=TOKEN)
    port = str(thread.port)
    monkeypatch.delenv("RECSERVE_ADMIN_TOKEN", raising=False)
    try:
        code, _, err = run_cli(capsys, "load", "small", "--port", port)
        assert code == 1 and "set RECSERVE_ADMIN_TOKEN" in err and "--token-file" in err
        wrong = tmp_path / "wrong"
        wrong.write_text("not-it\n")
        code, _, err = run_cli(capsys, "load", "small", "--token-file", str(wrong),
                               "--port", port)
        assert code == 1 and err.startswith("error: unauthorized")
        right = tmp_path / "token"
        right.write_text(TOKEN + "\n")  # (a trailing newline, as editors leave)
        code, out, _ = run_cli(capsys, "load", "small", "--token-file", str(right),
                               "--port", port)
        assert code == 0 and out.startswith("small version 2 is served")
        empty = tmp_path / "empty"
        empty.write_text("\n")
        with pytest.raises(ValueError, match="is empty"):
            admin_token(empty)
        assert admin_token(None, {"RECSERVE_ADMIN_TOKEN": "t"}) == "t"
    finally:
        thread.stop()


def test_the_async_client_loads_and_unloads(repo):
    thread = start(engine_backend(), repo, admin_token=TOKEN)

    async def admin():
        async with await AsyncClient.connect(port=thread.port) as client:
            first = await client.load("small", TOKEN, version=1)
            again = await client.reload("small", TOKEN)
            gone = await client.unload("small", TOKEN, version=2)
            return first, again, gone

    try:
        first, again, gone = asyncio.run(admin())
    finally:
        thread.stop()
    assert (first["model"], first["version"]) == ("small", 1)
    assert (again["version"], again["previous"]) == (2, 1)
    assert gone["unloaded"] == [2]


def test_admin_requests_and_what_the_cli_prints_of_them():
    assert admin_request("load", "ctr", "t", 3) == {"op": "load", "model": "ctr", "token": "t",
                                                   "version": 3}
    assert admin_request("unload", "ctr", "t") == {"op": "unload", "model": "ctr", "token": "t"}
    with pytest.raises(ValueError, match="not an admin op"):
        admin_request("infer", "ctr", "t")
    with pytest.raises(ValueError, match="use load"):
        admin_request("reload", "ctr", "t", 2)
    assert describe("unload", {"model": "ctr", "unloaded": [1, 2]}, 0.1) == (
        "ctr: versions 1, 2 unloaded")
    assert describe("unload", {"model": "ctr", "unloaded": []}, 0.1) == (
        "ctr: no version was served, nothing unloaded")
    assert describe("load", {"model": "ctr", "version": 3}, 2.04) == (
        "ctr version 3 is served; loaded in 2.0 s")
