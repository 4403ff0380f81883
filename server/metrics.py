"""Prometheus metrics in vramgate's own registry and ``vramgate_`` namespace.

Labels stay bounded (cases C19): ``model`` is a configured canonical name or ``unknown``; ``route`` is
a route template; ``status_class`` is ``2xx``/``4xx``/``5xx``. No request ids, users, keys or error
text ever become label values.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import disable_created_metrics

from server.bulkhist import BulkHistogram
from server.validation import ROUTES

UNKNOWN_MODEL = "unknown"
INFERENCE_ROUTES = tuple(ROUTES)
# Latency buckets in seconds: 5 ms up to 10 minutes (CPU engines and long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Seconds between tokens: vLLM's own inter_token_latency_seconds buckets, from 10 ms to 80 s, with
# 1 and 5 ms added below for small models and fast GPUs.
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


NAMESPACE = "vramgate"
BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired",
                  "cancelling", "cancelled")


class Metrics:
    """The gateway's metrics. Create one per app; ``render()`` gives the exposition text."""

    def __init__(self, models: dict[str, tuple[str, ...]], states: list[str]) -> None:
        """``models`` maps each canonical model name to the routes it serves; ``states`` are the
        model states ``vramgate_model_state`` reports."""
        disable_created_metrics()  # no *_created series: they double the series count for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see child()
        self._states = states
        self._gauged: set[str] = set()  # the models whose in-flight and queued gauges were set
        self.models = tuple(models)
        self._request_metrics()
        self._engine_metrics()
        self._device_metrics()
        self._batch_metrics()
        self._prefill(models)

    def _request_metrics(self) -> None:
        """Requests: counts, durations, TTFT, ITL, tokens, in flight, queued, refused."""
        ns = NAMESPACE
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
        self.itl = BulkHistogram("inter_token_latency_seconds",
                                 "Streamed requests: time between successive token events sent to "
                                 "the client (the first token excluded).", ["model"], namespace=ns,
                                 buckets=ITL_BUCKETS, registry=self.registry)  # a stream's in one call
        self.tokens = Counter("tokens", "Tokens of answered requests, by model and kind (prompt, "
                              "completion), from the engine's usage (streamed answers too).",
                              ["model", "kind"], namespace=ns, registry=self.registry)
        self.in_flight = Gauge("requests_in_flight", "Requests holding a lease on an engine.",
                               ["model"], namespace=ns, registry=self.registry)
        self.queued = Gauge("requests_queued", "Requests waiting for an engine: a concurrency slot, a loading engine or room.",
                            ["model"], namespace=ns, registry=self.registry)
        self.rejections = Counter("rejections", "Requests refused before the engine, by reason "
                                  "(queue_full, queue_timeout, rate_limit_exceeded, ...).",
                                  ["model", "reason"], namespace=ns, registry=self.registry)

    def _engine_metrics(self) -> None:
        """Models and engines: state, starts, failures, stops, load time, engines loaded."""
        ns = NAMESPACE
        self.model_state = Gauge("model_state", "1 for the state each model is in, else 0.",
                                 ["model", "state"], namespace=ns, registry=self.registry)
        self.engine_starts = Counter("engine_starts", "Engine processes started.", ["model"],
                                     namespace=ns, registry=self.registry)
        self.engine_failures = Counter("engine_failures", "Engines that failed to start, exited or "
                                       "failed their health checks.", ["model"], namespace=ns,
                                       registry=self.registry)
        self.engine_stops = Counter("engine_stops", "Engines stopped by vramgate, by reason "
                                    "(evicted, idle, unload).", ["model", "reason"], namespace=ns,
                                    registry=self.registry)
        self.load_seconds = Histogram("engine_load_seconds", "Engine start to healthy.", ["model"],
                                      namespace=ns, buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180,
                                                             300, 600, 1200), registry=self.registry)
        self.engine_sleeps = Counter("engine_sleeps", "Engines put into vLLM's sleep mode after "
                                     "sleep_after idle seconds.", ["model"], namespace=ns,
                                     registry=self.registry)
        self.engine_wakes = Counter("engine_wakes", "Sleeping engines woken for a request.",
                                    ["model"], namespace=ns, registry=self.registry)
        # vLLM's blog measured wakes of 0.1 s (small models, level 1) to about 6 s (235B).
        self.wake_seconds = Histogram("engine_wake_seconds", "A sleeping engine's /wake_up call, "
                                      "sent to answered.", ["model"], namespace=ns,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60),
                                      registry=self.registry)
        self.loaded = Gauge("engines_loaded", "Engines running (loading, ready or sleeping).", namespace=ns,
                            registry=self.registry)

    def _device_metrics(self) -> None:
        """Devices: GPU memory (NVML), utilisation, temperature, power; bytes booked."""
        ns = NAMESPACE
        gpu = ["gpu"]
        self.gpu_total = Gauge("gpu_memory_total_bytes", "GPU memory, as NVML reports it.", gpu,
                               namespace=ns, registry=self.registry)
        self.gpu_used = Gauge("gpu_memory_used_bytes", "GPU memory in use (all processes).", gpu,
                              namespace=ns, registry=self.registry)
        self.gpu_free = Gauge("gpu_memory_free_bytes", "GPU memory free.", gpu, namespace=ns,
                              registry=self.registry)
        self.gpu_reserved = Gauge("gpu_memory_reserved_bytes",
                                  "GPU memory vramgate has booked for its engines.", gpu,
                                  namespace=ns, registry=self.registry)
        self.gpu_util = Gauge("gpu_utilization_ratio", "GPU utilisation, 0 to 1.", gpu,
                              namespace=ns, registry=self.registry)
        self.gpu_temp = Gauge("gpu_temperature_celsius", "GPU temperature.", gpu, namespace=ns,
                              registry=self.registry)
        self.gpu_power = Gauge("gpu_power_watts", "GPU power draw.", gpu, namespace=ns,
                               registry=self.registry)
        self.cpu_reserved = Gauge("cpu_memory_reserved_bytes",
                                  "RAM vramgate has booked for its CPU engines.", namespace=ns,
                                  registry=self.registry)

    def _batch_metrics(self) -> None:
        """The Batch API: lines answered, batches by status, lines waiting, progress."""
        ns = NAMESPACE
        self.batch_requests = Counter("batch_requests", "Batch lines answered, by model and "
                                      "outcome (completed: 2xx, failed: an error line).",
                                      ["model", "outcome"], namespace=ns, registry=self.registry)
        self.batches = Gauge("batches", "Batches by status.", ["status"], namespace=ns,
                             registry=self.registry)
        self.batch_lines_queued = Gauge("batch_lines_queued", "Lines of running batches not "
                                        "answered yet.", ["model"], namespace=ns,
                                        registry=self.registry)
        self.batch_stalled = Gauge("batch_seconds_since_progress", "The longest time any "
                                   "in-progress batch has gone without an answered line.",
                                   namespace=ns, registry=self.registry)

    def set_model_gauges(self, in_flight: dict[str, int], queued: dict[str, int]) -> None:
        """The per-model gauges read at a scrape: requests in flight and queued, by model; a
        model a reload removed (set before, missing now) reads 0, not its last value."""
        for name in self._gauged - in_flight.keys():
            self.in_flight.labels(name).set(0)
            self.queued.labels(name).set(0)
        for name, count in in_flight.items():
            self.in_flight.labels(name).set(count)
            self.queued.labels(name).set(queued.get(name, 0))
        self._gauged = set(in_flight)

    def set_batches(self, statuses: dict[str, int], queued: dict[str, int], stalled: float) -> None:
        """Batch gauges at a scrape: counts by status, lines queued per model, seconds stalled."""
        for status in BATCH_STATUSES:
            self.batches.labels(status).set(statuses.get(status, 0))
        for model in self.models:
            self.batch_lines_queued.labels(model).set(queued.get(model, 0))
        self.batch_stalled.set(stalled)

    def _prefill(self, models: dict[str, tuple[str, ...]]) -> None:
        """Every known label set at 0, so a rate() over it exists before the first event."""
        for route in INFERENCE_ROUTES:
            self.requests.labels(UNKNOWN_MODEL, route, "4xx")
        for name, routes in models.items():
            self.in_flight.labels(name)
            self.queued.labels(name)
            self.engine_starts.labels(name)
            self.engine_failures.labels(name)
            self.load_seconds.labels(name)
            self.engine_sleeps.labels(name)
            self.engine_wakes.labels(name)
            self.wake_seconds.labels(name)
            self.itl.labels(name)
            for reason in ("evicted", "idle", "unload"):
                self.engine_stops.labels(name, reason)
            for outcome in ("completed", "failed"):
                self.batch_requests.labels(name, outcome)
            for route in routes:
                for cls in ("2xx", "4xx", "5xx"):
                    self.requests.labels(name, route, cls)

    # The pool's lifecycle events (see ModelPool's ``events``).
    def engine_started(self, model: str) -> None:
        self.engine_starts.labels(model).inc()

    def engine_failed(self, model: str) -> None:
        self.engine_failures.labels(model).inc()

    def engine_stopped(self, model: str, reason: str) -> None:
        self.engine_stops.labels(model, reason).inc()

    def engine_ready(self, model: str, seconds: float) -> None:
        self.load_seconds.labels(model).observe(seconds)

    def engine_slept(self, model: str) -> None:
        self.engine_sleeps.labels(model).inc()

    def engine_woke(self, model: str, seconds: float) -> None:
        self.engine_wakes.labels(model).inc()
        self.wake_seconds.labels(model).observe(seconds)

    def set_devices(self, devices, bookings, gpus=()) -> None:
        """Device gauges from a snapshot's ``devices``, the pool's ``bookings`` and, where NVML is
        real, its ``GpuInfo`` readings (utilisation, temperature, power)."""
        reserved: dict[str, int] = {}
        for b in bookings:
            for dev in b.devices:
                reserved[dev] = reserved.get(dev, 0) + b.bytes_per_device
            if b.host_bytes:  # a sleeping engine's weights in host RAM
                reserved["cpu"] = reserved.get("cpu", 0) + b.host_bytes
        for d in devices:
            if d.kind == "cpu":
                self.cpu_reserved.set(reserved.get("cpu", 0))
                continue
            g = str(d.index)
            self.gpu_total.labels(g).set(d.total_bytes)
            self.gpu_free.labels(g).set(d.free_bytes)
            self.gpu_used.labels(g).set(d.total_bytes - d.free_bytes)
            self.gpu_reserved.labels(g).set(reserved.get(d.id, 0))
        for info in gpus:
            g = str(info.index)
            if info.utilization_pct is not None:
                self.gpu_util.labels(g).set(info.utilization_pct / 100)
            if info.temperature_c is not None:
                self.gpu_temp.labels(g).set(info.temperature_c)
            if info.power_w is not None:
                self.gpu_power.labels(g).set(info.power_w)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus_client's ``labels`` checks,
        converts and locks on every call, and a request makes several (issue #15's profile).
        Label values are bounded (module docstring), and so is this cache."""
        key = (metric, labels)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*labels)
        return got

    def observe(self, model: str, route: str, status: int, seconds: float,
                tokens: dict[str, int] | None = None) -> None:
        """Count one answered request, its duration in seconds and its ``tokens`` by kind
        (``prompt``, ``completion``)."""
        self.child(self.requests, model, route, f"{status // 100}xx").inc()
        if model != UNKNOWN_MODEL:
            self.child(self.duration, model, route).observe(seconds)
        for kind, count in (tokens or {}).items():
            self.child(self.tokens, model, kind).inc(count)

    def set_states(self, states: dict[str, str]) -> None:
        """Set ``model_state`` from ``{model: state}``."""
        for model, current in states.items():
            for state in self._states:
                self.model_state.labels(model, state).set(1.0 if state == current else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
