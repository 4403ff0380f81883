"""The access log's direct writer and the cached metric children (issue #15's hot path)."""

from __future__ import annotations

import asyncio
import io
import logging
import re

from server.accesslog import AccessLog
from server.metrics import Metrics

PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO vramgate\.access: ")


class Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, s: str) -> int:
        self.calls += 1
        return super().write(s)


def test_one_turn_of_the_loop_is_one_write_after_the_turn(caplog):
    out = Writes()
    log = AccessLog(out)

    async def turn() -> str:
        for i in range(3):
            log.write("text", request_id=f"t{i}", status=200)
        seen_in_turn = out.getvalue()
        await asyncio.sleep(0)  # the loop's next turn: the flush has run
        return seen_in_turn
    with caplog.at_level(logging.INFO, logger="vramgate.access"):
        assert asyncio.run(turn()) == ""
    lines = out.getvalue().splitlines()
    assert out.calls == 1 and [line.rsplit(": ", 1)[1] for line in lines] == [
        "request_id=t0 status=200", "request_id=t1 status=200", "request_id=t2 status=200"]
    assert all(PREFIX.match(line) for line in lines)


def test_a_line_is_one_write_in_the_root_handlers_format(caplog):
    out = Writes()
    log = AccessLog(out)
    with caplog.at_level(logging.INFO, logger="vramgate.access"):
        log.write("text", request_id="r1", status=200, ttft_s=None)
        log.write("json", request_id="r2", status=503)
    assert caplog.records == []  # none went through logging
    first, second = out.getvalue().splitlines()
    assert out.calls == 2 and PREFIX.match(first) and PREFIX.match(second)
    assert first.endswith("vramgate.access: request_id=r1 status=200")  # None fields left out
    assert second.endswith('vramgate.access: {"request_id":"r2","status":503}')
    # The same prefix as logging's own formatter gives (milliseconds after a comma).
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("vramgate.access", logging.INFO, "", 0, "m", None, None)
    assert PREFIX.match(fmt.format(record))


def test_nothing_is_written_below_the_access_loggers_level():
    out = io.StringIO()
    logger = logging.getLogger("vramgate.access")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        AccessLog(out).write("text", status=200)
    finally:
        logger.setLevel(old)
    assert out.getvalue() == ""


def test_a_broken_stream_falls_back_to_logging(caplog):
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    log = AccessLog(Broken())
    with caplog.at_level(logging.INFO, logger="vramgate.access"):
        log.write("text", request_id="after-pipe")
        log.write("text", request_id="again")
    assert log.stream is None
    assert [r.getMessage() for r in caplog.records] == ["request_id=after-pipe", "request_id=again"]


def test_metric_children_are_looked_up_once_and_count():
    m = Metrics({"chat": ("/v1/chat/completions",)}, ["ready"])
    assert m.child(m.ttft, "chat", "/v1/chat/completions") is m.ttft.labels("chat", "/v1/chat/completions")
    m.observe("chat", "/v1/chat/completions", 200, 0.2, {"prompt": 7, "completion": 3})
    m.observe("chat", "/v1/chat/completions", 201, 0.1, {"prompt": 1})
    m.observe("unknown", "/v1/chat/completions", 404, 0.1)
    text = m.render().decode()
    assert 'vramgate_requests_total{model="chat",route="/v1/chat/completions",status_class="2xx"} 2.0' in text
    assert 'vramgate_tokens_total{kind="prompt",model="chat"} 8.0' in text
    assert 'vramgate_tokens_total{kind="completion",model="chat"} 3.0' in text
    assert 'vramgate_request_duration_seconds_count{model="chat",route="/v1/chat/completions"} 2.0' in text
    assert 'vramgate_request_duration_seconds_count{model="unknown"' not in text


def test_generated_request_ids_are_fresh_and_a_sane_given_one_is_kept():
    from server.requestid import request_id
    ids = [request_id(None) for _ in range(1000)]  # past one 4 KiB draw of random bytes
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert request_id("trace-1") == "trace-1" and len(request_id("bad id\n")) == 32


def test_text_lines_read_as_key_value_pairs_with_unsafe_values_quoted():
    """What the one-template formatting gives is what a pair at a time gave."""
    import json
    import random

    from server.accesslog import access_line

    unsafe = re.compile(r'[\x00-\x20\x7f"]')

    def pairwise(**fields):
        return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and unsafe.search(v) else v}"
                        for k, v in fields.items() if v is not None)
    rng = random.Random(15)
    values = [None, 0, 200, 0.0123, True, "instant", "a b", 'q"uote', "line\nforged=1", "50%",
              "%s", "ünïcode", "\x7f", ""]
    for _ in range(300):
        fields = {name: rng.choice(values) for name in rng.sample(
            ["request_id", "route", "model", "status", "duration_s", "key", "tools"], rng.randrange(8))}
        assert access_line("text", **fields) == pairwise(**fields)
    assert access_line("text", route="/v1/x y", status=200) == 'route="/v1/x y" status=200'


def test_a_model_removed_by_a_reload_reads_zero_in_flight_not_its_last_value():
    """The in-flight and queued gauges are set at each scrape from the scheduler; a model gone from
    it (a reload removed it while it had requests) must not keep its last reading."""
    m = Metrics({"keep": ("/v1/chat/completions",), "gone": ("/v1/chat/completions",)}, ["ready"])
    m.set_model_gauges({"keep": 1, "gone": 3}, {"keep": 0, "gone": 2})
    m.set_model_gauges({"keep": 0}, {"keep": 0})  # after the reload
    text = m.render().decode()
    assert 'vramgate_requests_in_flight{model="gone"} 0.0' in text
    assert 'vramgate_requests_queued{model="gone"} 0.0' in text
    assert 'vramgate_requests_in_flight{model="keep"} 0.0' in text
