"""Reading one model's entry of the configuration (``models[i]``) into a
:class:`~server.config.ModelConfig`, and the small readers the whole configuration shares. Every
error is a :class:`~server.errors.ConfigError` starting with the field path."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from server.config import _NAME_RE, DEVICES, TASKS, Distributed, ModelConfig, Upstream
from server.errors import ConfigError
from server.units import parse_bytes


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
               "fim_max_tokens", "engine_env", "cpu_cores", "upstreams", "distributed",
               "pipeline_parallel_size", "sleep_after", "sleep_level"}
MAX_TOKENS_POLICIES = ("fit", "reject")


def parse_model(raw: Any, where: str) -> ModelConfig:
    """Validate one entry of ``models`` (a mapping) into a :class:`ModelConfig`. Raises
    :class:`ConfigError` naming the field's path (``models[1].tensor_parallel_size: ...``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with at least name and path")
    unknown = sorted(map(str, set(raw) - _MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(_MODEL_KEYS))})")
    name = _name(raw.get("name"), f"{where}.name")
    upstreams = _upstreams(raw.get("upstreams"), f"{where}.upstreams")
    if upstreams and raw.get("path") is None:
        path = ""  # served by its upstreams only
        if raw.get("replicas", 0) != 0:
            raise ConfigError(f"{where}.replicas: local replicas need a path")
        raw = {**raw, "replicas": 0}
    else:
        path = _str(raw.get("path"), f"{where}.path")
    aliases_raw = raw.get("aliases") or []
    if not isinstance(aliases_raw, list):
        raise ConfigError(f"{where}.aliases: must be a list of names")
    aliases = tuple(_name(a, f"{where}.aliases[{i}]") for i, a in enumerate(aliases_raw))
    task = raw.get("task", "generate")
    if task not in TASKS:
        raise ConfigError(f"{where}.task: must be one of {', '.join(TASKS)}, got {task!r}")
    cores = raw.get("cpu_cores")
    return ModelConfig(**_generation_fields(raw, where), **_placement_fields(raw, where),
        **_lifecycle_fields(raw, where),
        engine_env=_engine_env(raw.get("engine_env"), f"{where}.engine_env"), upstreams=upstreams,
        cpu_cores=None if cores is None else int(_number(cores, f"{where}.cpu_cores", integer=True)),
        name=name, path=path, aliases=aliases, task=task,
        engine_args=_engine_args(raw.get("engine_args"), f"{where}.engine_args"),
    )


def _placement_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``device``, ``gpus``, ``tensor_parallel_size`` (a power of two, no more than ``gpus``),
    ``replicas`` (at most 64), ``memory``, ``kv_cache_bytes`` (bytes) and ``max_model_len``
    (tokens)."""
    device = raw.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"{where}.device: must be one of {', '.join(DEVICES)}, got {device!r}")
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
    replicas = int(_number(raw.get("replicas", 1), f"{where}.replicas", integer=True, positive=False))
    if replicas > 64:
        raise ConfigError(f"{where}.replicas: at most 64")
    if replicas < (0 if raw.get("upstreams") else 1):
        raise ConfigError(f"{where}.replicas: must be at least 1 (0 only beside upstreams)")
    kv, mml, mem = raw.get("kv_cache_bytes"), raw.get("max_model_len"), raw.get("memory")
    pp = int(_number(raw.get("pipeline_parallel_size", 1), f"{where}.pipeline_parallel_size",
                     integer=True))
    distributed = _distributed(raw.get("distributed"), f"{where}.distributed")
    if pp > 1 and distributed is None:
        raise ConfigError(f"{where}.pipeline_parallel_size: spans hosts, so it needs distributed")
    if distributed is not None and replicas != 1:
        raise ConfigError(f"{where}.replicas: a distributed model has one engine (replicas: 1)")
    return dict(
        device=device, gpus=gpus, tensor_parallel_size=tp, replicas=replicas,
        distributed=distributed, pipeline_parallel_size=pp,
        kv_cache_bytes=None if kv is None else parse_bytes(kv, f"{where}.kv_cache_bytes"),
        max_model_len=None if mml is None else int(_number(mml, f"{where}.max_model_len", integer=True)),
        memory_bytes=None if mem is None else parse_bytes(mem, f"{where}.memory"))


def _lifecycle_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``pinned``, ``preload``, ``ttl``, ``max_concurrency``, ``max_queue``, ``queue_timeout`` and
    ``startup_timeout`` (seconds)."""
    out: dict[str, Any] = {}
    for key in ("pinned", "preload"):
        out[key] = raw.get(key, False)
        if not isinstance(out[key], bool):
            raise ConfigError(f"{where}.{key}: must be true or false")
    out["ttl"] = float(_number(raw.get("ttl", 900), f"{where}.ttl", positive=False))
    if out["ttl"] < 0:
        raise ConfigError(f"{where}.ttl: must be 0 (never unload) or a number of seconds")
    for key in ("max_concurrency", "max_queue"):
        if raw.get(key) is not None:
            out[key] = int(_number(raw[key], f"{where}.{key}", integer=True, positive=False))
            if out[key] < (1 if key == "max_concurrency" else 0):
                raise ConfigError(f"{where}.{key}: must be at least {1 if key == 'max_concurrency' else 0}")
    out["queue_timeout"] = float(_number(raw.get("queue_timeout", 300.0), f"{where}.queue_timeout"))
    out.update(_sleep_fields(raw, where, out["ttl"]))
    out["startup_timeout"] = float(_number(raw.get("startup_timeout", 600.0),
                                           f"{where}.startup_timeout"))
    return out


def _sleep_fields(raw: dict[str, Any], where: str, ttl: float) -> dict[str, Any]:
    """``sleep_after`` (seconds, 0 = never; below ``ttl`` when the model unloads at all) and
    ``sleep_level`` (vLLM's: 1 or 2)."""
    after = float(_number(raw.get("sleep_after", 0), f"{where}.sleep_after", positive=False))
    if after < 0:
        raise ConfigError(f"{where}.sleep_after: must be 0 (never sleep) or a number of seconds")
    if after and ttl and after >= ttl:
        raise ConfigError(f"{where}.sleep_after: {after:g} s must be less than ttl ({ttl:g} s), "
                          f"or the engine unloads before it would sleep")
    level = raw.get("sleep_level", 1)
    if level not in (1, 2) or isinstance(level, bool):
        raise ConfigError(f"{where}.sleep_level: must be 1 (weights to host RAM) or 2 (weights "
                          f"discarded, reloaded from disk on wake)")
    return {"sleep_after": after, "sleep_level": level}


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
UPSTREAM_URL = re.compile(r"https?://[^/\s?#]+(/[^\s?#]*)?")


def _upstreams(value: Any, where: str) -> tuple[Upstream, ...]:
    """``upstreams``: a list of ``{url, api_key_env, model}`` (``url`` required; its path, if any,
    is where ``/v1/...`` and ``/health`` go below). An ``api_key_env`` must name a variable that
    is set, so a missing key fails the load and not the first request."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: must be a non-empty list of {{url, api_key_env, model}}")
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or set(item) - {"url", "api_key_env", "model"}:
            raise ConfigError(f"{at}: must be a mapping with url, and optionally api_key_env, model")
        url = _str(item.get("url"), f"{at}.url").rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        if not UPSTREAM_URL.fullmatch(url):
            raise ConfigError(f"{at}.url: must be http://host:port or https://host:port, got {url!r}")
        env = item.get("api_key_env")
        if env is not None:
            env = _str(env, f"{at}.api_key_env")
            if not ENV_NAME.fullmatch(env):
                raise ConfigError(f"{at}.api_key_env: {env!r} is not an environment variable name")
            if not os.environ.get(env):
                raise ConfigError(f"{at}.api_key_env: the environment variable {env} is not set")
        model = item.get("model")
        out.append(Upstream(url, env, None if model is None else _str(model, f"{at}.model")))
    if len({u.url for u in out}) != len(out):
        raise ConfigError(f"{where}: lists one url twice")
    return tuple(out)


def _distributed(value: Any, where: str) -> Distributed | None:
    """``distributed``: ``{backend: ray, address: HOST:PORT}`` (vLLM's Ray executor)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"backend", "address"}:
        raise ConfigError(f"{where}: must be a mapping with backend (ray) and address (HOST:PORT)")
    if value.get("backend", "ray") != "ray":
        raise ConfigError(f"{where}.backend: only ray is supported, got {value.get('backend')!r}")
    address = _str(value.get("address"), f"{where}.address")
    if not re.fullmatch(r"[A-Za-z0-9._-]+:\d{1,5}|auto", address):
        raise ConfigError(f"{where}.address: must be HOST:PORT (the Ray head, e.g. 10.0.0.1:6379)")
    return Distributed("ray", address)


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
