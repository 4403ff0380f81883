import json

from server.sse import EventSplitter, error_event, with_null_usage


def test_splitter_keeps_bytes_and_waits_for_whole_events():
    s = EventSplitter()
    assert s.feed(b'data: {"a":') == []
    assert s.feed(b'1}\n\ndata: [DO') == [b'data: {"a":1}\n\n']
    assert s.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]
    assert s.rest() == b""


def test_null_usage_added_only_where_missing():
    assert with_null_usage(b'data: {"a":1}\n\n') == b'data: {"a":1,"usage":null}\n\n'
    with_usage = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert with_null_usage(with_usage) == with_usage
    assert with_null_usage(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert with_null_usage(b": keep-alive\n\n") == b": keep-alive\n\n"
    out = with_null_usage(b'data: {"choices":[{"delta":{"content":"}"}}]}\n\n')
    assert json.loads(out[6:])["usage"] is None


def test_error_event_is_one_openai_error():
    ev = error_event("boom", code="engine_stream_failed")
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert json.loads(ev[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                            "code": "engine_stream_failed"}}
