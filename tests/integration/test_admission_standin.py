"""Admission through the real gateway (cases C11): concurrency, bounded queues, rate limits."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.gateway import standin_gateway, wait_for

CONFIG = {"api_keys": ["sk-open", {"key": "sk-slow", "rpm": 3}],
          "models": [{"name": "one", "path": "standin:delay=0.05", "preload": True,
                      "max_concurrency": 1, "max_queue": 0},
                     {"name": "queued", "path": "standin:delay=0.05", "preload": True,
                      "max_concurrency": 2, "max_queue": 30}]}
AUTH = {"authorization": "Bearer sk-open"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("adm"), CONFIG) as g:
        g.wait_states(60)
        yield g


def post(gw, model, max_tokens=20, headers=AUTH):
    return httpx.post(gw.url + "/v1/completions", headers=headers, timeout=60,
                      json={"model": model, "prompt": "x", "max_tokens": max_tokens})


def test_concurrency_one_queue_zero_rejects_the_rest_with_retry_after(gw):
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(post(gw, "one"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    rejected = [r for r in results if r.status_code == 503]
    assert len(ok) >= 1 and len(ok) + len(rejected) == 6 and rejected
    for r in rejected:
        assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    for r in ok:
        assert r.json()["choices"][0]["text"].count(" w") == 20  # accepted ones are whole


def test_four_times_the_capacity_loses_no_accepted_request_and_leaks_no_slot(gw):
    # max_concurrency 2 + max_queue 30 = 32; 128 clients.
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        r = post(gw, "queued", max_tokens=5)
        with lock:
            results.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"].count(" w") == 5

    threads = [threading.Thread(target=one) for _ in range(128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 128 and set(results) <= {200, 503} and results.count(200) >= 32
    text = httpx.get(gw.url + "/metrics").text
    assert 'vramgate_requests_in_flight{model="queued"} 0.0' in text
    assert 'vramgate_requests_queued{model="queued"} 0.0' in text


def test_priority_header_is_accepted(gw):
    r = post(gw, "queued", headers={**AUTH, "x-priority": "interactive"})
    assert r.status_code == 200


def test_requests_per_minute_per_key(gw):
    slow = {"authorization": "Bearer sk-slow"}
    assert [post(gw, "queued", 1, slow).status_code for _ in range(3)] == [200] * 3
    r = post(gw, "queued", 1, slow)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert post(gw, "queued", 1).status_code == 200  # another key is not affected
    assert 'vramgate_rejections_total{model="queued",reason="rate_limit_exceeded"} 1.0' in \
        httpx.get(gw.url + "/metrics").text


def test_a_queued_request_that_hangs_up_frees_its_place(gw):
    holders = [threading.Thread(target=lambda: post(gw, "queued", max_tokens=40)) for _ in range(2)]
    for t in holders:
        t.start()
    assert wait_for(lambda: 'vramgate_requests_in_flight{model="queued"} 2.0' in httpx.get(
        gw.url + "/metrics").text)  # both slots busy for about 2 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", headers=AUTH, timeout=httpx.Timeout(10, read=0.5),
                   json={"model": "queued", "prompt": "x", "max_tokens": 1})
    assert wait_for(lambda: 'vramgate_requests_queued{model="queued"} 0.0' in httpx.get(
        gw.url + "/metrics").text)
    for t in holders:
        t.join()
    assert post(gw, "queued", max_tokens=1).status_code == 200  # no slot leaked


def test_body_limit_and_request_id(gw):
    r = httpx.post(gw.url + "/v1/completions", headers={**AUTH, "x-request-id": "trace-123"},
                   json={"model": "queued", "prompt": "x", "max_tokens": 1})
    assert r.headers["x-request-id"] == "trace-123"
    r = httpx.post(gw.url + "/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"})
    assert len(r.headers["x-request-id"]) == 32  # generated, also on errors
    with httpx.stream("POST", gw.url + "/v1/completions", headers={**AUTH, "x-request-id": "s-1"},
                      json={"model": "queued", "prompt": "x", "max_tokens": 2, "stream": True}) as r:
        assert r.headers.get_list("x-request-id") == ["s-1"] and b"[DONE]" in r.read()
    # The key check answers an inference route before the fast path: its 401 carries the id too,
    # once, and its access-log line says 401 (the route passes through with the client's send).
    r = httpx.post(gw.url + "/v1/completions", headers={"authorization": "Bearer wrong",
                                                        "x-request-id": "denied-7"}, json={})
    assert r.status_code == 401 and r.headers.get_list("x-request-id") == ["denied-7"]
    assert wait_for(lambda: any("request_id=denied-7 method=POST route=/v1/completions status=401"
                                in line for line in gw.log_text().splitlines()))
    r = httpx.get(gw.url + "/v1/models", headers={"authorization": "Bearer wrong",
                                                  "x-request-id": "denied-8"})
    assert r.status_code == 401 and r.headers.get_list("x-request-id") == ["denied-8"]
    big = b'{"model": "queued", "prompt": "' + b"x" * (33 * 2**20) + b'"}'
    r = httpx.post(gw.url + "/v1/completions", headers=AUTH, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
