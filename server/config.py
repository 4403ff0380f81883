"""Configuration: a YAML file (or nothing: the embedded models) → frozen :class:`Settings`.

Every validation error is a :class:`~server.errors.ConfigError` whose message starts with the field
path, e.g. ``models[1].aliases[0]: must be a non-empty string``. Environment variables are read by the
CLI alone (``cli.py``, through click's ``envvar``), never here.

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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from server.auth import ApiKey, AuthConfig
from server.errors import ConfigError
from server.gpus.simulated import SimSpec, parse_spec
from server.units import parse_bytes

DEFAULT_ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
TASKS = ("generate", "embed")
DEVICES = ("auto", "cpu", "cuda")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]*$")

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
    never); ``preload`` starts the model with the server instead of on its first request.
    ``max_concurrency`` requests at its engines at once (``None``: no limit), ``max_queue`` waiting
    beyond those (``None``: no limit), each for at most ``queue_timeout`` seconds. ``engine_env``
    are environment variables for its engines (vLLM reads many settings from there, such as
    ``VLLM_CPU_OMP_THREADS_BIND``); placement owns ``CUDA_VISIBLE_DEVICES``. ``cpu_cores``: on
    the CPU, each of its engines gets that many cores of its own (``engines.cpu_binding``).

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


@dataclass(frozen=True)
class Settings:
    """The whole server configuration. Times are seconds; ``data_dir`` holds models and engine logs.
    ``stream_keepalive``: seconds between keep-alive events on a stream that waits for its engine
    (0: the stream waits silently)."""

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
    stream_keepalive: float = 4.0

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


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty string")
    return value


def _name(value: Any, where: str) -> str:
    value = _str(value, where)
    if not _NAME_RE.match(value):
        raise ConfigError(f"{where}: {value!r} may use letters, digits and . _ : / + - only")
    return value


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)) or not math.isfinite(value):
        raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be greater than 0")
    return value


def _engine_args(value: Any, where: str) -> tuple[str, ...]:
    """``engine_args`` as a list of strings or a mapping ``{flag: value}`` → argv tokens.

    In a mapping, ``true`` gives a bare ``--flag``, ``false``/``null`` omits it, lists repeat it.
    """
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(_str(v if not isinstance(v, (int, float)) else str(v), f"{where}[{i}]")
                     for i, v in enumerate(value))
    if isinstance(value, dict):
        out: list[str] = []
        for key, val in value.items():
            flag = "--" + _str(key, f"{where}.{key}").lstrip("-")
            if val is True:
                out.append(flag)
            elif val is False or val is None:
                continue
            elif isinstance(val, list):
                for v in val:
                    out += [flag, str(v)]
            elif isinstance(val, (dict,)):
                import json
                out += [flag, json.dumps(val)]
            else:
                out += [flag, str(val)]
        return tuple(out)
    raise ConfigError(f"{where}: must be a list of strings or a mapping of flag to value")


_MODEL_KEYS = {"name", "path", "aliases", "task", "device", "engine_args", "kv_cache_bytes",
               "max_model_len", "startup_timeout", "memory", "gpus", "tensor_parallel_size",
               "pinned", "replicas", "ttl", "preload", "max_concurrency", "max_queue",
               "queue_timeout", "tool_parser", "chat_template", "max_tokens_policy", "fim",
               "fim_max_tokens", "engine_env", "cpu_cores"}
MAX_TOKENS_POLICIES = ("fit", "reject")
_TOP_KEYS = {"host", "port", "data_dir", "models", "engine_module", "engine_python",
             "shutdown_timeout", "engine_stop_grace", "load_wait_timeout", "placement",
             "gpu_headroom", "kv_cache_sequences", "simulate_gpus", "max_loaded_models",
             "place_wait_timeout", "cpu_memory_budget", "api_keys", "admin_key", "metrics_auth",
             "cors_origins", "allowed_hosts", "max_body_bytes", "log_format", "stream_keepalive"}


def parse_model(raw: Any, where: str) -> ModelConfig:
    """Validate one entry of ``models`` (a mapping) into a :class:`ModelConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with at least name and path")
    unknown = sorted(map(str, set(raw) - _MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(_MODEL_KEYS))})")
    name = _name(raw.get("name"), f"{where}.name")
    path = _str(raw.get("path"), f"{where}.path")
    aliases_raw = raw.get("aliases") or []
    if not isinstance(aliases_raw, list):
        raise ConfigError(f"{where}.aliases: must be a list of names")
    aliases = tuple(_name(a, f"{where}.aliases[{i}]") for i, a in enumerate(aliases_raw))
    task = raw.get("task", "generate")
    if task not in TASKS:
        raise ConfigError(f"{where}.task: must be one of {', '.join(TASKS)}, got {task!r}")
    device = raw.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"{where}.device: must be one of {', '.join(DEVICES)}, got {device!r}")
    kv = raw.get("kv_cache_bytes")
    mml = raw.get("max_model_len")
    mem = raw.get("memory")
    gpus = raw.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or not gpus or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
            raise ConfigError(f"{where}.gpus: must be a non-empty list of GPU indices (0, 1, ...)")
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where}.gpus: lists a GPU twice")
        gpus = tuple(gpus)
    tp = raw.get("tensor_parallel_size")
    if tp is not None:
        tp = int(_number(tp, f"{where}.tensor_parallel_size", integer=True))
        if tp & (tp - 1):
            raise ConfigError(f"{where}.tensor_parallel_size: must be a power of two, got {tp}")
        if gpus is not None and len(gpus) < tp:
            raise ConfigError(f"{where}.tensor_parallel_size: {tp} needs at least {tp} GPUs in gpus")
    flags = {}
    for key in ("pinned", "preload"):
        flags[key] = raw.get(key, False)
        if not isinstance(flags[key], bool):
            raise ConfigError(f"{where}.{key}: must be true or false")
    replicas = int(_number(raw.get("replicas", 1), f"{where}.replicas", integer=True))
    if replicas > 64:
        raise ConfigError(f"{where}.replicas: at most 64")
    ttl = float(_number(raw.get("ttl", 900), f"{where}.ttl", positive=False))
    if ttl < 0:
        raise ConfigError(f"{where}.ttl: must be 0 (never unload) or a number of seconds")
    limits = {}
    for key in ("max_concurrency", "max_queue"):
        if raw.get(key) is not None:
            limits[key] = int(_number(raw[key], f"{where}.{key}", integer=True, positive=False))
            if limits[key] < (1 if key == "max_concurrency" else 0):
                raise ConfigError(f"{where}.{key}: must be at least {1 if key == 'max_concurrency' else 0}")
    limits["queue_timeout"] = float(_number(raw.get("queue_timeout", 300.0), f"{where}.queue_timeout"))
    cores = raw.get("cpu_cores")
    return ModelConfig(**_generation_fields(raw, where),
        engine_env=_engine_env(raw.get("engine_env"), f"{where}.engine_env"),
        cpu_cores=None if cores is None else int(_number(cores, f"{where}.cpu_cores", integer=True)),
        name=name, path=path, aliases=aliases, task=task, device=device,
        engine_args=_engine_args(raw.get("engine_args"), f"{where}.engine_args"),
        kv_cache_bytes=None if kv is None else parse_bytes(kv, f"{where}.kv_cache_bytes"),
        max_model_len=None if mml is None else int(_number(mml, f"{where}.max_model_len", integer=True)),
        startup_timeout=float(_number(raw.get("startup_timeout", 600.0), f"{where}.startup_timeout")),
        memory_bytes=None if mem is None else parse_bytes(mem, f"{where}.memory"),
        gpus=gpus, tensor_parallel_size=tp, replicas=replicas, ttl=ttl, **flags, **limits,
    )


def _fim(value: Any, where: str) -> dict[str, Any]:
    """``fim``: ``none``, a family name or format string, or ``{template, stop}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = {"template": value}
    if not isinstance(value, dict) or set(value) - {"template", "stop"}:
        raise ConfigError(f"{where}: must be none, a FIM family or template, or a mapping with "
                          "template and stop")
    template = _str(value.get("template"), f"{where}.template")
    stop = value.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{where}.stop: must be a list of non-empty strings")
    if template != "none":
        from server.fim import FAMILIES
        from string import Formatter
        try:
            fields = {f for _, f, _, _ in Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ConfigError(f"{where}.template: {exc} (write literal braces as {{{{ and }}}})") from None
        if template not in FAMILIES and fields != {"prefix", "suffix"}:
            raise ConfigError(f"{where}.template: must be one of {', '.join(FAMILIES)}, or a format "
                              "with {prefix} and {suffix} and no other {field}")
    return {"fim_template": template, "fim_stop": tuple(stop)}


def _engine_env(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``engine_env``: a mapping of variable name to a string (or number) value."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping of environment variable to value")
    out = []
    for name, val in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}: {name!r} is not an environment variable name")
        if name == "CUDA_VISIBLE_DEVICES":
            raise ConfigError(f"{where}.{name}: placement sets it; pin GPUs with gpus: [...]")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise ConfigError(f"{where}.{name}: must be a string or a number")
        out.append((name, str(val)))
    return tuple(out)


def _generation_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The generation-only fields of a model entry: tools, chat template, output budget, FIM."""
    out: dict[str, Any] = _fim(raw.get("fim"), f"{where}.fim")
    for key in ("tool_parser", "chat_template"):
        if raw.get(key) is not None:
            out[key] = _str(raw[key], f"{where}.{key}")
    if out.get("chat_template"):
        out["chat_template"] = str(Path(out["chat_template"]).expanduser())
        if not Path(out["chat_template"]).is_file():
            raise ConfigError(f"{where}.chat_template: {out['chat_template']} is not a file")
    policy = raw.get("max_tokens_policy", "fit")
    if policy not in MAX_TOKENS_POLICIES:
        raise ConfigError(f"{where}.max_tokens_policy: must be fit or reject, got {policy!r}")
    out["max_tokens_policy"] = policy
    if raw.get("fim_max_tokens") is not None:
        out["fim_max_tokens"] = int(_number(raw["fim_max_tokens"], f"{where}.fim_max_tokens",
                                            integer=True))
    return out


# YAML key → Settings field, for byte counts ("4GiB"); and keys that take one of a few words.
_BYTE_FIELDS = {"gpu_headroom": "gpu_headroom_bytes", "max_body_bytes": "max_body_bytes",
                "cpu_memory_budget": "cpu_memory_budget"}
_CHOICE_FIELDS = {"placement": ("pack", "spread"), "log_format": ("text", "json")}


def parse_auth(raw: dict[str, Any], env_keys: tuple[str, ...] = (),
               env_admin_key: str | None = None) -> AuthConfig:
    """``api_keys`` (strings, or mappings with ``key``, ``name``, ``models``, ``rpm``), ``admin_key``,
    ``metrics_auth``, ``cors_origins``; keys from the environment are added (``env-1``, …)."""
    keys: list[ApiKey] = []
    entries = raw.get("api_keys") or []
    if not isinstance(entries, list):
        raise ConfigError("api_keys: must be a list of keys")
    for i, item in enumerate(entries):
        where = f"api_keys[{i}]"
        if isinstance(item, str):
            keys.append(ApiKey(_str(item, where), name=f"key-{i + 1}"))
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a string or a mapping with key")
        unknown = sorted(map(str, set(item) - {"key", "name", "models", "rpm"}))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: key, models, name, rpm)")
        models = item.get("models")
        if models is not None and (not isinstance(models, list) or not all(
                isinstance(m, str) for m in models)):
            raise ConfigError(f"{where}.models: must be a list of model names")
        rpm = item.get("rpm")
        keys.append(ApiKey(_str(item.get("key"), f"{where}.key"),
                           name=str(item.get("name") or f"key-{i + 1}"),
                           models=tuple(models) if models is not None else None,
                           rpm=None if rpm is None else int(_number(rpm, f"{where}.rpm", integer=True))))
    keys += [ApiKey(k, name=f"env-{i + 1}") for i, k in enumerate(env_keys) if k]
    admin = raw.get("admin_key", env_admin_key)
    if env_admin_key:
        admin = env_admin_key
    metrics_auth = raw.get("metrics_auth", False)
    if not isinstance(metrics_auth, bool):
        raise ConfigError("metrics_auth: must be true or false")
    lists = {}
    for key, what in (("cors_origins", "origins"), ("allowed_hosts", "host names")):
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{key}: must be a list of {what} (or [\"*\"])")
        lists[key] = tuple(v.strip() for v in value)
    return AuthConfig(api_keys=tuple(keys),
                      admin_key=None if admin is None else _str(admin, "admin_key"),
                      metrics_auth=metrics_auth, **lists)


def parse_settings(raw: Any, *,
                   default_models: Callable[[Path], tuple[ModelConfig, ...]] | None = None,
                   **overrides: Any) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    ``default_models(data_dir)`` gives the models when the document has none; ``overrides`` (host, port,
    data_dir, …) win over the document, ``None`` values are ignored. Raises :class:`ConfigError`.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level): must be a mapping")
    unknown = sorted(map(str, set(raw) - _TOP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(_TOP_KEYS))})")
    kw: dict[str, Any] = {}
    if "host" in raw:
        kw["host"] = _str(raw["host"], "host")
    if "port" in raw:
        port = int(_number(raw["port"], "port", integer=True))
        if not 0 < port < 65536:
            raise ConfigError("port: must be between 1 and 65535")
        kw["port"] = port
    if "data_dir" in raw:
        kw["data_dir"] = Path(_str(raw["data_dir"], "data_dir")).expanduser()
    for key in ("engine_module", "engine_python"):
        if key in raw:
            kw[key] = _str(raw[key], key)
    for key in ("shutdown_timeout", "engine_stop_grace", "load_wait_timeout", "place_wait_timeout",
                "stream_keepalive"):
        if key in raw:
            kw[key] = float(_number(raw[key], key, positive=key not in (
                "place_wait_timeout", "stream_keepalive")))
            if kw[key] < 0:
                raise ConfigError(f"{key}: must not be negative")
    for key in ("kv_cache_sequences", "max_loaded_models"):
        if key in raw:
            kw[key] = int(_number(raw[key], key, integer=True))
    for key, field_name in _BYTE_FIELDS.items():
        if key in raw:
            kw[field_name] = parse_bytes(raw[key], key)
    for key, choices in _CHOICE_FIELDS.items():
        if key in raw:
            if raw[key] not in choices:
                raise ConfigError(f"{key}: must be {' or '.join(choices)}, got {raw[key]!r}")
            kw[key] = raw[key]
    if "simulate_gpus" in raw or overrides.get("simulate_gpus"):
        spec = overrides.get("simulate_gpus") or _str(raw["simulate_gpus"], "simulate_gpus")
        kw["simulate_gpus"] = parse_spec(spec)  # a bad layout is a configuration error now
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise ConfigError("models: must be a non-empty list")
        models = tuple(parse_model(m, f"models[{i}]") for i, m in enumerate(raw["models"]))
    else:
        data_dir = overrides.get("data_dir") or kw.get("data_dir") or Settings.__dataclass_fields__[
            "data_dir"].default_factory()
        models = default_models(Path(data_dir)) if default_models else ()
    if not models:
        raise ConfigError("models: no models configured")
    seen: dict[str, str] = {}
    for i, model in enumerate(models):
        for j, key in enumerate((model.name, *model.aliases)):
            where = f"models[{i}].name" if j == 0 else f"models[{i}].aliases[{j - 1}]"
            if key in seen:
                raise ConfigError(f"{where}: {key!r} is already used by {seen[key]}")
            seen[key] = where
    kw["models"] = models
    env_keys = tuple(overrides.pop("api_keys", None) or ())
    kw["auth"] = parse_auth(raw, env_keys, overrides.pop("admin_key", None))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**kw)


def load_settings(path: Path | None, *,
                  default_models: Callable[[Path], tuple[ModelConfig, ...]] | None = None,
                  **overrides: Any) -> Settings:
    """Read ``path`` (YAML) if given and validate it; see :func:`parse_settings`."""
    raw: Any = None
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_settings(raw, default_models=default_models, **overrides)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # What the field checks did not foresee (a self-referencing YAML anchor, say).
        raise ConfigError(f"{path or 'configuration'}: invalid: {exc.__class__.__name__}: {exc}") from exc
