import json

from server.errors import (EngineStartError, InvalidRequest, ModelNotFound, ModelUnavailable,
                           normalize_upstream_error)


def test_envelope_and_headers():
    err = ModelNotFound("x")
    assert err.status == 404
    assert err.envelope()["error"]["code"] == "model_not_found"
    assert set(err.envelope()["error"]) == {"message", "type", "param", "code"}
    assert err.headers() == {"x-should-retry": "false"}
    assert ModelUnavailable("busy", retry_after=2.4).headers() == {"retry-after": "2"}
    assert InvalidRequest("bad", param="messages").envelope()["error"]["param"] == "messages"


def test_engine_start_error_carries_log_tail():
    err = EngineStartError("engine exited", log_tail="line1\nOOM")
    assert err.status == 503 and "OOM" in err.message and err.log_tail.endswith("OOM")


def test_vllm_error_is_normalised():
    body = json.dumps({"error": {"message": "max_tokens too big", "type": "BadRequestError",
                                 "param": "max_tokens", "code": 400}}).encode()
    err = normalize_upstream_error(400, body)
    assert err.status == 400
    assert err.envelope() == {"error": {"message": "max_tokens too big", "type": "invalid_request_error",
                                        "param": "max_tokens", "code": None}}


def test_non_json_and_detail_bodies():
    assert normalize_upstream_error(500, b"Internal Server Error").envelope()["error"] == {
        "message": "Internal Server Error", "type": "server_error", "param": None, "code": None}
    err = normalize_upstream_error(422, json.dumps({"detail": "field required"}).encode())
    assert err.message == "field required" and err.type == "invalid_request_error"
    assert normalize_upstream_error(502, b"").message == "engine answered HTTP 502"


def test_access_line_and_usage_counts():
    from server.accesslog import access_line
    from server.sse import usage_counts
    body = b'{"choices": [], "usage": {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2}}'
    assert usage_counts(body) == {"prompt": 7, "completion": 2}
    assert usage_counts(b"{}") == {}
    responses = b'"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":3}'
    assert usage_counts(responses) == {"prompt": 5, "completion": 3}
    assert access_line("text", a=1, b=None, c="x") == "a=1 c=x"
    # A decoded path cannot forge a line or a field (found by a break-it run).
    forged = access_line("text", route="/v1/x\n2026-01-01 INFO vramgate.access: status=200", status=404)
    assert "\n" not in forged and forged.endswith(" status=404")
    assert forged.startswith('route="/v1/x\\n2026-01-01 INFO vramgate.access: status=200"')
    assert access_line("text", route='/a"b', x="\x00") == 'route="/a\\"b" x="\\u0000"'
    assert json.loads(access_line("json", a=1, b=None)) == {"a": 1}
