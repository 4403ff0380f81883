"""The Batch API's pure parts and its store: input checks, windows, result files, pagination."""

from __future__ import annotations

import json

import pytest

from server.batchcheck import MAX_LINES, check_lines
from server.batchrunner import window_seconds
from server.batchstore import BatchStore, ResultFile, owner_of, read_results
from server.batchstore import result_line, usage_of


def line(cid, model="m", url="/v1/chat/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": {"model": model, "messages": []}}).encode() + b"\n"


def known(name):
    return None if name in ("m", "n") else ("model_not_found", "no such model")


def test_a_good_file_gives_its_model_and_ids():
    out = check_lines([line("a"), b"\n", line("b")], "/v1/chat/completions", 10, known)
    assert out.errors == [] and out.model == "m" and out.custom_ids == ["a", "b"]


@pytest.mark.parametrize("lines, code, number", [
    ([line("a"), b"not json\n"], "invalid_json_line", 2),
    ([b"[1, 2]\n"], "invalid_json_line", 1),
    ([line("a"), line("a")], "duplicate_custom_id", 2),
    ([line("a", url="/v1/completions")], "url_mismatch", 1),
    ([line("a"), line("b", model="n")], "model_mismatch", 2),
    ([line("a", model="zzz")], "model_not_found", 1),
    ([b" \n"], "empty_file", None),
    ([b'{"custom_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"], "invalid_json_line", 1),
    # Readable, but deeper than a request body may nest (validation.MAX_DEPTH): its body could
    # not always be encoded again for the engine.
    ([line("a"), b'{"custom_id": "b", "x": ' + b"[" * 600 + b"]" * 600 + b"}\n"], "invalid_json_line", 2),
])
def test_each_fault_names_its_line(lines, code, number):
    out = check_lines(lines, "/v1/chat/completions", 10, known)
    assert out.errors[0]["code"] == code and out.errors[0]["line"] == number


def test_limits_on_lines_and_bytes():
    many = (line(f"x{i}") for i in range(MAX_LINES + 1))
    out = check_lines(many, "/v1/chat/completions", 10, known)
    assert out.errors[-1]["code"] == "too_many_tasks" and out.errors[-1]["line"] == MAX_LINES + 1
    big = check_lines([], "/v1/chat/completions", 200_000_001, known)
    assert big.errors[0]["code"] == "file_too_large"


def test_completion_windows():
    assert window_seconds("24h") == 86400 and window_seconds("90m") == 5400
    assert window_seconds("2s") == 2
    assert window_seconds("48h") is None and window_seconds("1d") is None and window_seconds(24) is None


def test_a_partial_last_line_left_by_a_kill_is_cut(tmp_path):
    path = tmp_path / "out.jsonl"
    f = ResultFile(path)
    f.append([result_line("a", "r", 200, {"ok": 1})])
    f.close()
    with open(path, "ab") as raw:
        raw.write(b'{"id": "half')  # the kill came mid-write
    assert [r["custom_id"] for r in read_results(path)] == ["a"]
    again = ResultFile(path)
    again.append([result_line("b", "r", 200, {})])
    again.close()
    assert [r["custom_id"] for r in read_results(path)] == ["a", "b"]


def test_usage_in_either_apis_names():
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == (3, 4)
    assert usage_of({"usage": {"input_tokens": 5, "output_tokens": 6}}) == (5, 6)
    assert usage_of({"data": []}) == (0, 0) and usage_of(None) == (0, 0)


def test_listing_is_in_creation_order_per_owner(tmp_path):
    store = BatchStore(tmp_path)
    for i in range(4):
        store.add_file({"id": f"f{i}", "owner": "a" if i != 2 else "b", "bytes": 1,
                        "created_at": 5, "filename": "x", "purpose": "batch",
                        "status": "processed", "expires_at": 10 + i, "path": str(tmp_path / "x")})
    assert [r["id"] for r in store.list_files("a", None, None, 10, "desc")] == ["f3", "f1", "f0"]
    assert [r["id"] for r in store.list_files("a", None, "f3", 10, "desc")] == ["f1", "f0"]
    assert [r["id"] for r in store.list_files(None, None, "f0", 2, "asc")] == ["f1", "f2"]
    assert store.expired_files(11.5) == ["f0", "f1"]
    store.close()


def test_owners_are_hashes_never_keys():
    from server.auth import ApiKey
    assert owner_of(None) == ""
    owner = owner_of(ApiKey("sk-secret"))
    assert "sk-secret" not in owner and owner == owner_of(ApiKey("sk-secret", name="other"))


def test_the_runner_deletes_expired_files_and_resumes_nothing_when_idle(tmp_path):
    import asyncio

    from server.batchrunner import BatchRunner

    async def go():
        store = BatchStore(tmp_path)
        path = tmp_path / "files" / "old.jsonl"
        path.write_bytes(b"{}\n")
        for file_id, expires in (("old", 50), ("new", 500), ("kept", None)):
            store.add_file({"id": file_id, "owner": "", "bytes": 3, "created_at": 1,
                            "filename": "x", "purpose": "batch", "status": "processed",
                            "expires_at": expires, "path": str(path if file_id == "old" else
                                                               tmp_path / "none")})
        runner = BatchRunner(store, service=None, settings=lambda: None, clock=lambda: 100.0)
        await runner.start()
        for _ in range(500):  # the timer's first pass runs at once; wait for its writes
            if await store.call(store.get_file, "old") is None:
                break
            await asyncio.sleep(0.01)
        assert store.get_file("old") is None and not path.exists()
        assert store.get_file("new") is not None and store.get_file("kept") is not None
        assert runner.tasks == {}
        await runner.stop()
        store.close()
    asyncio.run(go())
