"""Reading the configuration: a YAML file (or nothing: the embedded models) → frozen
:class:`~server.config.Settings`.

Every validation error is a :class:`~server.errors.ConfigError` whose message starts with the field
path, e.g. ``models[1].aliases[0]: must be a non-empty string``. Environment variables are read by the
CLI alone (``cli.py``, through click's ``envvar``), never here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from server.auth import ApiKey, AuthConfig
from server.config import ModelConfig, Settings
from server.configmodel import _number, _str, parse_model
from server.errors import ConfigError
from server.gpus.simulated import parse_spec
from server.units import parse_bytes  # noqa: F401  (re-exported for callers that parse sizes)


_TOP_KEYS = {"host", "port", "data_dir", "models", "engine_module", "engine_python",
             "shutdown_timeout", "engine_stop_grace", "load_wait_timeout", "placement",
             "gpu_headroom", "kv_cache_sequences", "simulate_gpus", "max_loaded_models",
             "place_wait_timeout", "cpu_memory_budget", "api_keys", "admin_key", "metrics_auth",
             "cors_origins", "allowed_hosts", "max_body_bytes", "log_format", "stream_keepalive",
             "batch_concurrency", "batch_beside", "max_file_bytes", "traffic_interval",
             "engine_transport", "access_log"}


_BYTE_FIELDS = {"gpu_headroom": "gpu_headroom_bytes", "max_body_bytes": "max_body_bytes",
                "cpu_memory_budget": "cpu_memory_budget", "max_file_bytes": "max_file_bytes"}
_CHOICE_FIELDS = {"placement": ("pack", "spread"), "log_format": ("text", "json"),
                  "engine_transport": ("unix", "tcp")}


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
    kw = _scalar_fields(raw)
    if "simulate_gpus" in raw or overrides.get("simulate_gpus"):
        spec = overrides.get("simulate_gpus") or _str(raw["simulate_gpus"], "simulate_gpus")
        kw["simulate_gpus"] = parse_spec(spec)  # a bad layout is a configuration error now
    kw["models"] = _models(raw, overrides.get("data_dir") or kw.get("data_dir"), default_models)
    env_keys = tuple(overrides.pop("api_keys", None) or ())
    kw["auth"] = parse_auth(raw, env_keys, overrides.pop("admin_key", None))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**kw)


def _scalar_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The top level's plain fields: host, port, data_dir, engine module and Python, the timeouts
    (seconds), counts, byte sizes, switches and choices."""
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
                "stream_keepalive", "traffic_interval"):
        if key in raw:
            kw[key] = float(_number(raw[key], key, positive=key not in (
                "place_wait_timeout", "stream_keepalive")))
            if kw[key] < 0:
                raise ConfigError(f"{key}: must not be negative")
    if kw.get("traffic_interval", 1.0) < 0.1:  # each sample reads the whole registry
        raise ConfigError("traffic_interval: must be at least 0.1 (seconds)")
    for key in ("kv_cache_sequences", "max_loaded_models", "batch_concurrency", "batch_beside"):
        if key in raw:
            kw[key] = int(_number(raw[key], key, integer=True, positive=key != "batch_beside"))
            if kw[key] < 0:
                raise ConfigError(f"{key}: must not be negative")
    for key, field_name in _BYTE_FIELDS.items():
        if key in raw:
            kw[field_name] = parse_bytes(raw[key], key)
    if "access_log" in raw:
        if not isinstance(raw["access_log"], bool):
            raise ConfigError(f"access_log: must be true or false, got {raw['access_log']!r}")
        kw["access_log"] = raw["access_log"]
    for key, choices in _CHOICE_FIELDS.items():
        if key in raw:
            if raw[key] not in choices:
                raise ConfigError(f"{key}: must be {' or '.join(choices)}, got {raw[key]!r}")
            kw[key] = raw[key]
    return kw


def _models(raw: dict[str, Any], data_dir: Any,
            default_models: Callable[[Path], tuple[ModelConfig, ...]] | None) -> tuple[ModelConfig, ...]:
    """``models``, or ``default_models(data_dir)`` when the document has none; every name and
    alias used once."""
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise ConfigError("models: must be a non-empty list")
        models = tuple(parse_model(m, f"models[{i}]") for i, m in enumerate(raw["models"]))
    else:
        data_dir = data_dir or Settings.__dataclass_fields__["data_dir"].default_factory()
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
    return models


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
