"""End to end lifecycle on real vLLM CPU engines: load on first request (one engine for many
callers), unload after a short TTL (process gone, memory back), reload on the next request, and
eviction when a memory budget holds only one of the two embedded models."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from server.models import CHAT_MODEL, EMBED_MODEL, ensure_prepared
from tests.gateway import Gateway, alive, describe, embedded_data_dir, wait_for, wait_gone

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Say hello"}]


def engine_pids(gw: Gateway, model: str) -> list[int]:
    data = gw.client.get("/admin/models").json()["data"]
    pids = [r["pid"] for m in data if m["id"] == model for r in m["replicas"] if r["pid"]]
    out = []
    for pid in pids:
        try:
            out += [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            pass
    return out


def wait_state(gw: Gateway, model: str, state: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.states()[model] == state:
            return True
        time.sleep(0.2)
    return False


def cpu_reserved(gw: Gateway) -> int:
    return next(d for d in gw.client.get("/admin/gpus").json()["devices"]
                if d["id"] == "cpu")["reserved_bytes"]


def test_on_demand_ttl_and_eviction(tmp_path):
    data_dir = embedded_data_dir()
    ensure_prepared(data_dir)
    models = data_dir / "models"
    config = {
        # Room for one of the two engines at a time: chat books about 1.2 GiB, embeddings 0.65 GiB.
        "cpu_memory_budget": "1600MiB",
        "place_wait_timeout": 60,
        "models": [
            {"name": CHAT_MODEL, "path": str(models / CHAT_MODEL), "aliases": ["smollm2"], "ttl": 4},
            {"name": EMBED_MODEL, "path": str(models / EMBED_MODEL), "task": "embed", "ttl": 0},
        ],
    }
    gw = Gateway(tmp_path, config, data_dir=data_dir)
    try:
        gw.wait_up(60)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=300)
        assert gw.states() == {CHAT_MODEL: "unloaded", EMBED_MODEL: "unloaded"}
        assert gw.descendants() == []  # nothing runs before the first request

        # Eight callers at once, model not loaded: one engine starts, all eight succeed.
        replies: list[str] = []

        def ask() -> None:
            r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4)
            replies.append(r.choices[0].message.content)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        assert wait_state(gw, CHAT_MODEL, "loading", 30)
        for t in threads:
            t.join()
        assert len(replies) == 8
        assert gw.log_text().count(f"starting engine for {CHAT_MODEL}#0") == 1
        chat_pids = engine_pids(gw, CHAT_MODEL)
        assert len(chat_pids) >= 3 and cpu_reserved(gw) > 0

        # Idle for its 4 s TTL: unloaded, every process gone, its memory back in the books.
        assert wait_state(gw, CHAT_MODEL, "unloaded", 30)
        assert wait_gone(chat_pids, 30) == []
        assert cpu_reserved(gw) == 0

        # The embedding model loads; then the chat model needs the room: the idle embedding
        # engine is evicted (logged with its numbers) and the chat model reloads.
        emb = client.embeddings.create(model=EMBED_MODEL, input="hello")
        assert len(emb.data[0].embedding) == 384
        emb_pids = engine_pids(gw, EMBED_MODEL)
        # Streamed, so the cold start is seen from the client (C23): headers at once, then a
        # keep-alive comment at least every 5 s until the first token.
        t0 = time.monotonic()
        body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=300) as s:
            headers_at = time.monotonic()
            headers_after = headers_at - t0
            assert s.status_code == 200 and s.headers["x-accel-buffering"] == "no"
            arrivals = [(time.monotonic(), line) for line in s.iter_lines() if line]
        assert headers_after < 2.5, headers_after
        first = next(i for i, (_, line) in enumerate(arrivals) if line.startswith("data: {"))
        waits = [arrivals[0][0] - headers_at] + [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:first + 1])]
        assert first >= 2 and all(line == ": keep-alive" for _, line in arrivals[:first])
        assert max(waits) <= 5.0, waits
        assert arrivals[-1][1] == "data: [DONE]"
        assert gw.states()[EMBED_MODEL] == "unloaded"
        assert wait_gone(emb_pids, 30) == []
        assert f"evicting {EMBED_MODEL}" in gw.log_text()
        assert gw.log_text().count(f"starting engine for {CHAT_MODEL}#0") == 2
        last = engine_pids(gw, CHAT_MODEL)

        # SIGKILL the engine's guard and its API server together: vLLM's EngineCore (in their
        # process group) must not outlive them, and nothing of the group is left by the time the
        # gateway shows the engine failed; the next request starts a replacement.
        guard, server = last[0], psutil.Process(last[0]).children()[0].pid
        os.kill(guard, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        assert wait_state(gw, CHAT_MODEL, "failed", 60)
        assert [p for p in last if alive(p)] == [], describe(last)

        def answered() -> bool:
            try:
                return bool(client.chat.completions.create(model="smollm2", messages=HELLO,
                                                           max_tokens=2).choices)
            except openai.APIStatusError as exc:  # inside the restart back-off
                assert exc.status_code == 503, exc
                return False
        assert wait_for(answered, 300)
        assert gw.log_text().count(f"starting engine for {CHAT_MODEL}#0") == 3
        last = engine_pids(gw, CHAT_MODEL)
    finally:
        gw.stop(signal.SIGTERM)
    assert wait_gone(last, 30) == []
