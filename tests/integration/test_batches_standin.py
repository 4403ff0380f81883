"""The Batch API through the real gateway on stand-in engines, driven by the official ``openai``
client: the workflow, each validation failure, cancel, expiry, a SIGKILL mid-batch, key
isolation, and batch lines waiting behind interactive requests."""

from __future__ import annotations

import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from tests.gateway import ROOT, Gateway, standin_gateway, wait_for

KEYS = ["sk-a", "sk-b"]
CONFIG = {"api_keys": KEYS, "admin_key": "sk-admin", "batch_concurrency": 2,
          "max_file_bytes": "8MiB",
          "models": [{"name": "fast", "path": "standin:ok", "preload": True},
                     {"name": "slow", "path": "standin:delay=0.1", "preload": True,
                      "max_concurrency": 1, "max_queue": 50},
                     {"name": "other", "path": "standin:ok"},
                     {"name": "instant", "path": "standin:delay=0"},
                     {"name": "emb", "path": "standin:ok", "task": "embed"}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("batch"), CONFIG) as g:
        g.wait_states(60, done=("ready", "unloaded", "failed"))
        yield g


def client(gw: Gateway, key: str = "sk-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def task(cid: str, model: str = "fast", url: str = "/v1/completions", words: int = 3) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": model, "prompt": cid, "max_tokens": words}}


def submit(c: openai.OpenAI, data: bytes, endpoint: str = "/v1/completions",
           window: str = "24h") -> str:
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window=window).id


def wait_status(c: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 60):
    found = {}

    def done() -> bool:
        found["b"] = c.batches.retrieve(batch_id)
        return found["b"].status in statuses
    assert wait_for(done, timeout), found["b"]
    return found["b"]


def results(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in c.files.content(file_id).text.splitlines()]


def test_the_sdk_workflow_end_to_end(gw):
    c = client(gw)
    batch_id = submit(c, jsonl([task(f"r{i}", words=i + 1) for i in range(5)]))
    b = wait_status(c, batch_id, ("completed", "failed"))
    assert b.status == "completed", b
    assert b.request_counts.total == 5 and b.request_counts.completed == 5
    assert b.request_counts.failed == 0 and b.error_file_id is None
    assert b.model == "fast" and b.in_progress_at and b.finalizing_at and b.completed_at
    out = results(c, b.output_file_id)
    assert sorted(r["custom_id"] for r in out) == [f"r{i}" for i in range(5)]
    for r in out:
        words = int(r["custom_id"][1:]) + 1
        assert r["response"]["status_code"] == 200 and r["error"] is None
        assert r["response"]["body"]["usage"]["completion_tokens"] == words
        assert r["response"]["request_id"] == f"{batch_id}:{r['custom_id']}"
    assert b.usage.output_tokens == sum(range(1, 6)) and b.usage.input_tokens == 15
    meta = c.files.retrieve(b.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(c.files.content(b.output_file_id).content)
    listed = c.batches.list(limit=100)
    assert batch_id in [x.id for x in listed.data]
    # Each line went through the request path: the access log names the batch and the line.
    assert wait_for(lambda: f"{batch_id}:r4" in gw.log_text(), 5)
    files = gw.tmp / "data" / "batches" / "files"
    assert not [p.name for p in files.iterdir() if p.stat().st_size == 0]  # no empty result file
    shown = subprocess.run([sys.executable, "-m", "server", "batches", "list", "--url", gw.url,
                            "--key", "sk-a"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert re.search(rf"^{batch_id}\s+completed\s+fast\s+/v1/completions\s+5/5$", shown.stdout, re.M)
    cancel = subprocess.run([sys.executable, "-m", "server", "batches", "cancel", batch_id,
                             "--url", gw.url, "--key", "sk-b"], capture_output=True, text=True, cwd=ROOT)
    assert cancel.returncode == 1 and "No batch found" in cancel.stderr  # another key's batch


def test_an_upload_over_max_file_bytes_is_a_413_and_the_server_goes_on(gw):
    c = client(gw)
    with pytest.raises(openai.APIStatusError) as err:
        c.files.create(file=("big.jsonl", io.BytesIO(b"x" * (9 << 20))), purpose="batch")
    assert err.value.status_code == 413 and "max_file_bytes" in err.value.message
    assert c.files.create(file=("small.jsonl", io.BytesIO(b"{}\n")), purpose="batch").bytes == 3


def test_an_engine_error_goes_to_the_error_file_with_the_engines_body(gw):
    c = client(gw)
    bad = task("too-long")
    bad["body"]["max_tokens"] = 5000  # the stand-in refuses over 1000 with a 400
    b = wait_status(c, submit(c, jsonl([task("fine"), bad])), ("completed", "failed"))
    assert b.status == "completed" and b.request_counts.failed == 1
    errors = results(c, b.error_file_id)
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400
    assert "error" in errors[0]["response"]["body"]


VALIDATION = [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "fast"}}\n{oops\n',
     "invalid_json_line", 2),
    (jsonl([task("a"), task("a")]), "duplicate_custom_id", 2),
    (jsonl([task("a"), task("b", url="/v1/chat/completions")]), "url_mismatch", 2),
    (jsonl([task("a"), task("b", model="other")]), "model_mismatch", 2),
    (jsonl([task("a", model="nope")]), "model_not_found", 1),
    (b"\n\n", "empty_file", None),
    (jsonl([{"custom_id": "a", "method": "POST", "url": "/v1/completions"}]),
     "missing_required_parameter", 1),
    (b'{"custom_id": "a", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     "invalid_json_line", 1),  # deeper than Python's stack
    (jsonl([task("a", model="emb")]), "model_not_supported", 1),
]


@pytest.mark.parametrize("data, code, line", VALIDATION, ids=[v[1] for v in VALIDATION])
def test_an_invalid_input_file_fails_the_batch_with_the_line(gw, data, code, line):
    c = client(gw)
    b = wait_status(c, submit(c, data), ("failed", "completed", "in_progress"))
    assert b.status == "failed" and b.failed_at
    assert b.errors.data[0].code == code and b.errors.data[0].line == line, b.errors


def test_a_file_over_50000_lines_is_refused(gw):
    c = client(gw)
    line = json.dumps(task("x")).encode() + b"\n"
    data = b"".join(line.replace(b'"x"', f'"x{i}"'.encode()) for i in range(50_001))
    b = wait_status(c, submit(c, data), ("failed", "completed", "in_progress"), timeout=120)
    assert b.status == "failed" and b.errors.data[0].code == "too_many_tasks"
    assert b.errors.data[0].line == 50_001


def test_bad_create_requests_are_clear_400s(gw):
    c = client(gw)
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl([task("a")]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        c.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        c.batches.create(input_file_id="file-missing", endpoint="/v1/completions",
                         completion_window="24h")
    assert err.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="48h")
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("x", io.BytesIO(b"{}")), purpose="nonsense")
    assert err.value.body["param"] == "purpose"


def test_cancel_mid_run_keeps_the_finished_lines(gw):
    c = client(gw)
    batch_id = submit(c, jsonl([task(f"c{i}", model="slow", words=5) for i in range(40)]))
    wait_for(lambda: c.batches.retrieve(batch_id).request_counts.completed >= 2, 60)
    text = httpx.get(gw.url + "/metrics").text
    queued = re.search(r'^vramgate_batch_lines_queued\{model="slow"\} (\S+)', text, re.M)
    assert queued and 0 < float(queued.group(1)) <= 38, queued  # the lines not answered yet
    assert re.search(r"^vramgate_batch_seconds_since_progress \S+", text, re.M)
    assert c.batches.cancel(batch_id).status == "cancelling"
    b = wait_status(c, batch_id, ("cancelled",))
    assert b.cancelling_at and b.cancelled_at
    done = results(c, b.output_file_id)
    assert 2 <= len(done) < 40 and b.request_counts.completed == len(done)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(batch_id)


def test_past_the_completion_window_the_batch_expires(gw):
    c = client(gw)
    b = wait_status(c, submit(c, jsonl([task(f"e{i}", model="slow", words=10) for i in range(30)]),
                              window="2s"), ("expired",), timeout=60)
    done, expired = results(c, b.output_file_id), results(c, b.error_file_id)
    assert len(done) + len(expired) == 30 and expired
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}
    assert all(e["response"] is None for e in expired)
    assert b.expired_at and b.request_counts.failed == len(expired)


def test_keys_see_only_their_own_files_and_batches(gw):
    a, b, admin = client(gw, "sk-a"), client(gw, "sk-b"), client(gw, "sk-admin")
    f = a.files.create(file=("mine.jsonl", io.BytesIO(jsonl([task("k")]))), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id),
                 lambda: b.batches.retrieve(batch.id), lambda: b.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # B cannot run a batch over A's file
        b.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert f.id not in [x.id for x in b.files.list()]
    assert batch.id not in [x.id for x in b.batches.list()]
    assert admin.files.retrieve(f.id).id == f.id and admin.batches.retrieve(batch.id).id == batch.id
    wait_status(a, batch.id, ("completed",))  # the input of a batch still running stays
    assert a.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)


def test_file_listing_pages_with_after_and_limit(gw):
    c = client(gw, "sk-b")
    ids = [c.files.create(file=(f"p{i}.jsonl", io.BytesIO(b"{}\n")), purpose="user_data").id
           for i in range(3)]
    page = c.files.list(limit=2, purpose="user_data", order="asc")
    assert [x.id for x in page.data] == ids[:2] and page.has_more
    rest = c.files.list(limit=2, purpose="user_data", order="asc", after=ids[1])
    assert [x.id for x in rest.data] == ids[2:]


def test_batch_lines_wait_behind_interactive_requests(gw):
    """``slow`` runs one request at a time: while a batch line runs and another waits, an
    interactive request that arrives later still runs before that next batch line."""
    c = client(gw)
    batch_id = submit(c, jsonl([task(f"q{i}", model="slow", words=20) for i in range(3)]))
    stats_path = gw.tmp / "standin" / "slow.json"

    def prompts() -> list:
        try:
            return json.loads(stats_path.read_text()).get("prompts") or []
        except (OSError, ValueError):
            return []

    def queued() -> float:
        text = httpx.get(gw.url + "/metrics").text
        m = re.search(r'^vramgate_requests_queued\{model="slow"\} (\S+)', text, re.M)
        return float(m.group(1)) if m else 0.0
    assert wait_for(lambda: "q0" in prompts() and queued() >= 1, 30)
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=httpx.post(
        gw.url + "/v1/completions", headers={"authorization": "Bearer sk-a", "x-priority": "interactive"},
        json={"model": "slow", "prompt": "interactive", "max_tokens": 2}, timeout=60)))
    thread.start()
    assert wait_for(lambda: queued() >= 2, 30)
    thread.join(60)
    assert answer["r"].status_code == 200
    wait_status(c, batch_id, ("completed",))
    order = [p for p in prompts() if p in ("q0", "q1", "q2", "interactive")]
    assert order.index("interactive") < order.index("q1"), order


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_stop_mid_batch_resumes_without_running_a_written_line_again(tmp_path, sig):
    config = {**CONFIG, "batch_concurrency": 1}
    g = standin_gateway(tmp_path, config)
    g.wait_states(60, done=("ready", "unloaded", "failed"))
    c = client(g)
    batch_id = submit(c, jsonl([task(f"s{i}", model="slow", words=3) for i in range(12)]))
    assert wait_for(lambda: c.batches.retrieve(batch_id).request_counts.completed >= 3, 60)
    g.stop(sig)
    db = sqlite3.connect(tmp_path / "data" / "batches" / "state.sqlite3")
    doc = json.loads(db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
    db.close()
    out_path = tmp_path / "data" / "batches" / "files" / f"{doc['_output']}.jsonl"
    written = {json.loads(line)["custom_id"] for line in out_path.read_text().splitlines()}
    assert len(written) >= 3
    with standin_gateway(tmp_path, config) as again:
        again.wait_states(60, done=("ready", "unloaded", "failed"))
        b = wait_status(client(again), batch_id, ("completed",))
        out = results(client(again), b.output_file_id)
        assert sorted(r["custom_id"] for r in out) == sorted(f"s{i}" for i in range(12))
        log = again.log_text()  # both runs' access logs (one file)
    for cid in written:
        served = re.findall(rf"{batch_id}:{cid}\b.*status=200|status=200.*{batch_id}:{cid}\b", log)
        assert len(served) == 1, (cid, served)


def test_a_full_disk_fails_the_batch_clearly_and_the_server_goes_on(tmp_path):
    """RLIMIT_FSIZE of 1 MiB on the gateway: its result file cannot grow past it (EFBIG, the way
    a full disk refuses a write), while its log, database and the engines' files stay under it."""
    g = standin_gateway(tmp_path, CONFIG, max_file_size=1 << 20)
    try:
        g.wait_states(60, done=("ready", "unloaded", "failed"))
        c = client(g)
        batch_id = submit(c, jsonl([task(f"d{i}", model="instant", words=1000) for i in range(400)]))
        b = wait_status(c, batch_id, ("failed", "completed"), timeout=120)
        assert b.status == "failed" and b.errors.data[0].code == "server_error", b
        assert "File too large" in b.errors.data[0].message
        kept = results(c, b.output_file_id)  # the answers written before the disk filled
        assert kept and len(kept) == b.request_counts.completed
        r = c.completions.create(model="fast", prompt="still here", max_tokens=3)
        assert r.usage.completion_tokens == 3
        small = wait_status(c, submit(c, jsonl([task("after")])), ("completed", "failed"))
        assert small.status == "completed"
    finally:
        g.stop()


def test_odd_ids_bodies_and_deletes_get_clear_answers(gw):
    c = client(gw)
    odd = ["a\r\nX-Evil: 1", "a\u0000b", "x" * 5000, "plain-1"]
    b = wait_status(c, submit(c, jsonl([task(cid) for cid in odd])), ("completed", "failed"))
    assert b.status == "completed" and b.request_counts.completed == 4, b
    out = {r["custom_id"]: r for r in results(c, b.output_file_id)}
    assert sorted(out) == sorted(odd)
    assert out["plain-1"]["response"]["request_id"] == f"{b.id}:plain-1"
    for cid in odd[:3]:  # an id unfit for a header or a log line is hashed there
        assert re.fullmatch(rf"{b.id}:h[0-9a-f]{{24}}", out[cid]["response"]["request_id"])
    assert "X-Evil" not in gw.log_text() and "\x00" not in gw.log_text()
    with pytest.raises(openai.BadRequestError) as err:
        f = c.files.create(file=("m.jsonl", io.BytesIO(jsonl([task("m")]))), purpose="batch")
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                         metadata={"k": "v" * 513})
    assert err.value.body["param"] == "metadata"
    too_big = httpx.post(gw.url + "/v1/batches", headers={"authorization": "Bearer sk-a"},
                         content=b'{"metadata": "' + b"x" * (33 << 20) + b'"}', timeout=60)
    assert too_big.status_code == 413
    slow = submit(c, jsonl([task(f"busy{i}", model="slow", words=5) for i in range(20)]))
    input_id = c.batches.retrieve(slow).input_file_id
    with pytest.raises(openai.ConflictError):  # the input of a batch that has not ended
        c.files.delete(input_id)
    c.batches.cancel(slow)
    wait_status(c, slow, ("cancelled",))
    assert c.files.delete(input_id).deleted
