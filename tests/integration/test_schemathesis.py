"""Property-based API testing with schemathesis against the gateway's own OpenAPI document, in
front of stand-in engines: whatever the body, no 5xx from the gateway and every error in the
envelope (the Anthropic shape on /v1/messages*)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.gateway import standin_gateway

CONFIG = {"models": [{"name": "echo", "path": "standin:ok", "preload": True, "aliases": ["a"]},
                     {"name": "emb", "path": "standin:ok", "task": "embed", "preload": True}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("st"), CONFIG) as g:
        g.wait_states(60)
        yield g


def check(case) -> None:
    response = case.call(timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and {"type", "message"} <= set(body["error"])
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, body


def test_no_5xx_and_every_error_in_the_envelope(gateway):
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case) -> None:
            check(case)

        run()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in
                  gateway.client.get("/metrics").text.splitlines()
                  if line.startswith("vramgate_requests_total"))
    assert counted >= 100  # the generated requests really reached the inference routes
