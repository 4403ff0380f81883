"""Prometheus metrics in vramgate's own registry and ``vramgate_`` namespace.

Labels stay bounded (cases C19): ``model`` is a configured canonical name or ``unknown``; ``route`` is
a route template; ``status_class`` is ``2xx``/``4xx``/``5xx``. No request ids, users, keys or error
text ever become label values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics

UNKNOWN_MODEL = "unknown"
INFERENCE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Latency buckets in seconds: 5 ms up to 10 minutes (CPU engines and long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The gateway's metrics. Create one per app; ``render()`` gives the exposition text."""

    def __init__(self, models: dict[str, tuple[str, ...]], states: list[str]) -> None:
        """``models`` maps each canonical model name to the routes it serves."""
        disable_created_metrics()  # no *_created series: they double the series count for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        ns = "vramgate"
        self.requests = Counter("requests", "Requests answered, by model, route and status class.",
                                ["model", "route", "status_class"], namespace=ns,
                                registry=self.registry)
        self.duration = Histogram("request_duration_seconds",
                                  "Time from request arrival to the end of the response body.",
                                  ["model", "route"], namespace=ns, buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.ttft = Histogram("time_to_first_token_seconds",
                              "Streamed requests: time from arrival to the first byte from the engine.",
                              ["model", "route"], namespace=ns, buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.in_flight = Gauge("requests_in_flight", "Requests holding a lease on an engine.",
                               ["model"], namespace=ns, registry=self.registry)
        self.queued = Gauge("requests_queued", "Requests waiting for a concurrency slot.",
                            ["model"], namespace=ns, registry=self.registry)
        self.rejections = Counter("rejections", "Requests refused before the engine, by reason "
                                  "(queue_full, queue_timeout, rate_limit_exceeded, ...).",
                                  ["model", "reason"], namespace=ns, registry=self.registry)
        self.model_state = Gauge("model_state", "1 for the state each model is in, else 0.",
                                 ["model", "state"], namespace=ns, registry=self.registry)
        self._states = states
        for route in INFERENCE_ROUTES:
            self.requests.labels(UNKNOWN_MODEL, route, "4xx")
        for name, routes in models.items():
            self.in_flight.labels(name)
            self.queued.labels(name)
            for route in routes:
                for cls in ("2xx", "4xx", "5xx"):
                    self.requests.labels(name, route, cls)

    def observe(self, model: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration in seconds."""
        self.requests.labels(model, route, f"{status // 100}xx").inc()
        if model != UNKNOWN_MODEL:
            self.duration.labels(model, route).observe(seconds)

    def set_states(self, states: dict[str, str]) -> None:
        """Set ``model_state`` from ``{model: state}``."""
        for model, current in states.items():
            for state in self._states:
                self.model_state.labels(model, state).set(1.0 if state == current else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
