"""Configuration types: the frozen :class:`Settings` and :class:`ModelConfig`. They are read from
a YAML file (or nothing: the embedded models) by ``server.configload``, whose every validation
error is a :class:`~server.errors.ConfigError` starting with the field path, e.g.
``models[1].aliases[0]: must be a non-empty string``.

Example::

    host: 127.0.0.1
    port: 8000
    models:
      - name: qwen2.5-7b-instruct          # the served model name clients send as "model"
        path: Qwen/Qwen2.5-7B-Instruct     # a local folder or a Hugging Face id
        aliases: [qwen, default]
        engine_args: {max-model-len: 8192, enable-auto-tool-choice: true, tool-call-parser: hermes}
      - name: bge-small
        path: /models/bge-small-en-v1.5
        task: embed                        # served for /v1/embeddings (vLLM --runner pooling)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from server.auth import AuthConfig
from server.gpus.simulated import SimSpec

DEFAULT_ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
TASKS = ("generate", "embed")
DEVICES = ("auto", "cpu", "cuda")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]*$")


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible server elsewhere that serves a model (config ``upstreams[i]``):
    ``url`` (``http[s]://host:port``, no ``/v1``), the environment variable holding its API key
    (``api_key_env``; ``None``: it needs none) and ``model``, the name it serves the model under
    (``None``: the same served model name as here)."""

    url: str
    api_key_env: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Distributed:
    """A model whose one engine spans several hosts (config ``distributed``): vLLM's
    ``backend`` executor (``ray``) on the cluster whose head is at ``address`` (``HOST:PORT``)."""

    backend: str
    address: str

@dataclass(frozen=True)
class ModelConfig:
    """One servable model.

    ``name`` is the served model name (what clients send and what the engine is told);
    ``aliases`` resolve to the same engine. ``task`` is ``generate`` (chat and completions) or
    ``embed`` (embeddings, vLLM ``--runner pooling``). ``engine_args`` are extra vLLM command-line
    arguments, passed through verbatim after ours. ``kv_cache_bytes`` fixes vLLM's KV cache
    (``--kv-cache-memory-bytes``); ``None`` lets vramgate size it. ``startup_timeout`` is in seconds.
    ``memory_bytes`` (config ``memory``) replaces the estimate of weights + KV cache; ``gpus`` pins
    the model to those GPU indices; ``tensor_parallel_size`` fixes the TP size; ``pinned`` models
    are never evicted. ``replicas`` engines serve the model (each request goes to the one with the
    fewest in flight); an idle replica unloads ``ttl`` seconds after its last request ended (0 =
    never); ``preload`` starts the model with the server instead of on its first request. On a GPU,
    ``sleep_after`` (seconds, 0 = never) puts an idle engine into vLLM's sleep mode at
    ``sleep_level`` (1: weights to host RAM, 2: weights discarded) before ``ttl`` unloads it
    (``server.sleep``).
    ``max_concurrency`` requests at its engines at once (``None``: no limit), ``max_queue`` waiting
    beyond those (``None``: no limit), each for at most ``queue_timeout`` seconds. ``engine_env``
    are environment variables for its engines (vLLM reads many settings from there, such as
    ``VLLM_CPU_OMP_THREADS_BIND``); placement owns ``CUDA_VISIBLE_DEVICES``. ``cpu_cores``: on
    the CPU, each of its engines gets that many cores of its own (``engines.cpu_binding``).
    ``upstreams`` are servers on other hosts that serve the model too, one replica each after the
    ``replicas`` local engines (0 local ones when there is no ``path``); ``distributed`` runs its
    one engine over a Ray cluster, ``tensor_parallel_size`` GPUs on each of
    ``pipeline_parallel_size`` hosts.

    Generation models: ``tool_parser`` is vLLM's tool-call parser (``None``: chosen from the model's
    files, ``"none"``: no tools); ``chat_template`` a template file for vLLM's ``--chat-template``;
    ``max_tokens_policy`` ``fit`` serves a request asking for more output tokens than the context
    holds with what fits, ``reject`` leaves vLLM's 400. ``fim_template`` (config ``fim``) overrides
    the FIM format found in the tokenizer (a family of ``server.fim.FAMILIES`` or a format string,
    ``"none"`` refuses ``suffix``), with ``fim_stop`` added to its stops; ``fim_max_tokens`` is the
    output budget of a FIM request that sets none (tokens).
    """

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    task: str = "generate"
    device: str = "auto"
    engine_args: tuple[str, ...] = ()
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    startup_timeout: float = 600.0
    memory_bytes: int | None = None
    gpus: tuple[int, ...] | None = None
    tensor_parallel_size: int | None = None
    pinned: bool = False
    replicas: int = 1
    ttl: float = 900.0
    preload: bool = False
    max_concurrency: int | None = None
    max_queue: int | None = None
    queue_timeout: float = 300.0
    tool_parser: str | None = None
    chat_template: str | None = None
    max_tokens_policy: str = "fit"
    fim_template: str | None = None
    fim_stop: tuple[str, ...] = ()
    fim_max_tokens: int = 128
    engine_env: tuple[tuple[str, str], ...] = ()
    cpu_cores: int | None = None
    upstreams: tuple[Upstream, ...] = ()
    distributed: Distributed | None = None
    pipeline_parallel_size: int = 1
    sleep_after: float = 0.0
    sleep_level: int = 1

    @property
    def engines(self) -> int:
        """All its replicas: the local engines, then one per upstream."""
        return self.replicas + len(self.upstreams)

    def upstream(self, index: int) -> Upstream | None:
        """The upstream that replica ``index`` is, or ``None`` for a local engine."""
        return self.upstreams[index - self.replicas] if index >= self.replicas else None


@dataclass(frozen=True)
class Settings:
    """The whole server configuration. Times are seconds; ``data_dir`` holds models and engine logs.
    ``stream_keepalive``: seconds between keep-alive events on a stream that waits for its engine
    (0: the stream waits silently). ``batch_concurrency``: lines of one batch in flight at once;
    ``batch_beside``: batch-priority leases a model may hold while other requests run on it;
    ``max_file_bytes``: the largest upload ``POST /v1/files`` takes (bytes);
    ``traffic_interval``: seconds between the samples of the console's traffic charts;
    ``engine_transport``: ``unix`` (local engines on Unix sockets, :mod:`server.localsock`) or
    ``tcp`` (on loopback ports); read at each engine start. ``access_log``: whether each request
    writes its access-log line (in ``log_format``)."""

    models: tuple[ModelConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "vramgate")
    engine_module: str = DEFAULT_ENGINE_MODULE
    engine_python: str | None = None
    shutdown_timeout: float = 30.0
    engine_stop_grace: float = 15.0
    load_wait_timeout: float = 900.0
    placement: str = "pack"
    gpu_headroom_bytes: int = 1 << 30
    kv_cache_sequences: int = 4
    simulate_gpus: SimSpec | None = None  # parsed once, here (server.gpus.simulated)
    max_loaded_models: int | None = None
    place_wait_timeout: float = 10.0
    cpu_memory_budget: int | None = None
    auth: AuthConfig = AuthConfig()
    max_body_bytes: int = 32 * 2**20
    log_format: str = "text"
    access_log: bool = True  # one line per request (server.accesslog); off behind an ingress that logs
    stream_keepalive: float = 4.0
    batch_concurrency: int = 2  # lines of one batch in flight at once (server.batchrunner)
    batch_beside: int = 0  # batch leases on a model while other requests run on it (decisions)
    max_file_bytes: int = 512 * 2**20  # the largest upload to /v1/files
    traffic_interval: float = 5.0  # seconds between the console's traffic samples (server.traffic)
    engine_transport: str = "unix"  # local engines listen on a Unix socket, or ("tcp") a port

    @property
    def log_dir(self) -> Path:
        """Where each engine's output goes: ``<data_dir>/logs/<model>.log``."""
        return self.data_dir / "logs"

    def resolve(self, name: str) -> ModelConfig | None:
        """The model whose name or alias is ``name`` (exact match), or ``None``."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model
        return None
