import pytest

from server.errors import InvalidRequest
from server.validation import parse_body, routes_for_task, validate

MSG = [{"role": "user", "content": "hi"}]


def bad(route, body):
    with pytest.raises(InvalidRequest) as info:
        validate(route, body)
    return info.value


def test_valid_requests():
    p = validate("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert (p.model, p.stream, p.include_usage) == ("m", True, True)
    assert not validate("/v1/completions", {"model": "m", "prompt": [1, 2]}).stream
    assert validate("/v1/embeddings", {"model": "m", "input": ["a"]}).model == "m"
    tool_reply = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    validate("/v1/chat/completions", {"model": "m", "messages": MSG + tool_reply})


@pytest.mark.parametrize("messages,param", [
    (None, "messages"), ([], "messages"), ("hi", "messages"), ([1], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"), ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
])
def test_bad_messages(messages, param):
    err = bad("/v1/chat/completions", {"model": "m", "messages": messages})
    assert err.param == param and err.status == 400


def test_model_and_other_fields():
    assert bad("/v1/chat/completions", {"messages": MSG}).param == "model"
    assert bad("/v1/chat/completions", {"model": 3, "messages": MSG}).param == "model"
    assert bad("/v1/completions", {"model": "m", "prompt": ""}).param == "prompt"
    assert bad("/v1/embeddings", {"model": "m", "input": []}).param == "input"
    assert bad("/v1/embeddings", {"model": "m"}).param == "input"
    assert bad("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": "yes"}).param == "stream"
    assert bad("/v1/chat/completions", {"model": "m", "messages": MSG,
                                        "stream_options": {"include_usage": True}}).param == "stream_options"


def test_parse_body():
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[1]", b"\xff", b""):
        with pytest.raises(InvalidRequest):
            parse_body(raw)


def test_routes_for_task():
    assert routes_for_task("embed") == ("/v1/embeddings",)
    assert routes_for_task("generate")[:2] == ("/v1/chat/completions", "/v1/completions")
    assert "/v1/messages" in routes_for_task("generate")


def test_deep_nesting_is_a_400_not_a_crash():
    deep = b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_body(deep)


@pytest.mark.parametrize("depth", [600, 1000, 1023])
@pytest.mark.parametrize("huge", ["", ', "seed": 123456789012345678901234567890'])
def test_nesting_orjson_reads_but_json_could_not_encode_again_is_a_400(depth, huge):
    """orjson reads 1,024 levels; Python's json, in the gateway, gave up near 965, and a body read
    that deep could not be encoded again for the engine (a 500, found by a break-it run). The
    limit is MAX_DEPTH on every path, the slow one (a huge integer) too."""
    import json as _json

    from server.validation import MAX_DEPTH
    raw = (b'{"model": "m"' + huge.encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}")
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_body(raw)
    ok = b'{"model": "m", "x": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert _json.dumps(parse_body(ok))  # it can be encoded again


def test_engine_body_asks_for_usage_without_touching_the_rest():
    import json as _json

    from server.validation import engine_body
    raw = b' {"model": "m", "stream": true, "messages": [{"role": "user", "content": "\\u00e9 x"}]}'
    p = validate("/v1/chat/completions", _json.loads(raw))
    out = engine_body(raw, p, "m", want_usage=True)
    assert _json.loads(out) == dict(_json.loads(raw), stream_options={"include_usage": True})
    assert out.endswith(raw[2:])  # spliced in, the rest byte for byte
    assert engine_body(raw, p, "m", want_usage=False) is raw
    alias = engine_body(raw, p, "served", want_usage=True)
    assert _json.loads(alias)["model"] == "served"
    assert _json.loads(alias)["stream_options"] == {"include_usage": True}
    for options in ({"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True},
                    {"continuous_usage_stats": False}):
        body = {"model": "m", "stream": True, "prompt": "x", "stream_options": options}
        raw2 = _json.dumps(body).encode()
        out = engine_body(raw2, validate("/v1/completions", body), "m", want_usage=True)
        assert out == raw2  # the client's own stream options are kept as they are
    body = {"model": "m", "stream": True, "prompt": "x", "stream_options": {"include_usage": False}}
    out = engine_body(_json.dumps(body).encode(), validate("/v1/completions", body), "m", want_usage=True)
    assert _json.loads(out)["stream_options"] == {"include_usage": True}
    plain = {"model": "m", "prompt": "x"}
    raw3 = _json.dumps(plain).encode()
    assert engine_body(raw3, validate("/v1/completions", plain), "m", want_usage=True) is raw3


def test_engine_body_cases_found_by_the_break_it_pass():
    import json as _json

    from server.validation import engine_body, truthy
    # "stream_options": null: a spliced duplicate key would lose to the client's null
    body = {"model": "m", "stream": True, "prompt": "x", "stream_options": None}
    raw = _json.dumps(body).encode()
    out = _json.loads(engine_body(raw, validate("/v1/completions", body), "m", want_usage=True))
    assert out["stream_options"] == {"include_usage": True}
    # include_usage as vLLM's pydantic reads it: "true" and 1 are a yes, so nothing is added or dropped
    for value in ("true", 1, "on", True):
        body = {"model": "m", "stream": True, "prompt": "x", "stream_options": {"include_usage": value}}
        raw = _json.dumps(body).encode()
        parsed = validate("/v1/completions", body)
        assert parsed.include_usage and engine_body(raw, parsed, "m", want_usage=True) is raw
    assert not any(truthy(v) for v in ("false", 0, 2, "", None, "maybe", [1]))
    # UTF-16 and UTF-32 bodies are re-encoded, never spliced
    for enc in ("utf-16", "utf-16-le", "utf-32"):
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hé"}]}
        raw = _json.dumps(body).encode(enc)
        out = engine_body(raw, validate("/v1/chat/completions", parse_body(raw)), "m", want_usage=True)
        assert _json.loads(out) == dict(body, stream_options={"include_usage": True})


def test_stream_is_not_the_gateways_business_on_routes_that_do_not_stream():
    for route, body in (("/v1/embeddings", {"model": "m", "input": "x", "stream": True}),
                        ("/v1/messages/count_tokens", {"model": "m", "stream": True,
                                                       "messages": [{"role": "user", "content": "x"}]})):
        p = validate(route, body)
        assert (p.stream, p.include_usage) == (False, False)


@pytest.mark.parametrize("raw, expected", [
    (b'{"model": "\\ud800x"}', {"model": "\ud800x"}),  # a lone surrogate escape
    (b'{"temperature": NaN}', None),  # Python's json reads NaN; orjson refuses it
    (b'{"seed": 123456789012345678901234567890}', {"seed": 123456789012345678901234567890}),
    (b'{"x": [{"y": -9223372036854775809}]}', {"x": [{"y": -9223372036854775809}]}),  # nested
    (b'{"x": 18446744073709551615, "f": 1e300}', {"x": 18446744073709551615, "f": 1e300}),
    ('{"model": "m\u00e9"}'.encode("utf-16"), {"model": "m\u00e9"}),  # json detects UTF-16
    (b'{"a": 1, "a": 2}', {"a": 2}),  # a repeated key: the last one, as before
])
def test_what_orjson_refuses_is_read_as_pythons_json_reads_it(raw, expected):
    import json as _json
    import math

    got = parse_body(raw)
    if expected is None:
        assert math.isnan(got["temperature"])
    else:
        assert got == expected == _json.loads(raw)


def test_a_bad_body_gets_pythons_json_error_message():
    with pytest.raises(InvalidRequest) as exc:
        parse_body(b'{"model": "m",}')
    assert "Expecting property name enclosed in double quotes" in exc.value.message
