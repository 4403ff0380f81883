"""A simulated GPU inventory for layouts we do not have (tests, ``vramgate plan``).

Spec, as a string (``--simulate-gpus``, ``simulate_gpus:`` in the config)::

    2x80GiB,1x24GiB          two 80 GiB GPUs and one 24 GiB GPU, all empty
    2x80GiB@64GiB            two 80 GiB GPUs on which other processes hold 64 GiB each
    1x24GiB;engine=2GiB      every engine takes 2 GiB when ready (default: its whole share)
    1x24GiB;engine.m=2GiB    the engine of model "m" takes 2 GiB

or as a YAML file path whose document is ``{gpus: [{memory, used_by_others, name}], engine_memory:
{default or MODEL: bytes}}``. Memory an engine takes counts from the moment it is ready, the way
vLLM takes its ``--gpu-memory-utilization`` share (or, with ``engine_memory``, the smaller amount
it really used: cases C18). The CPU device is real (psutil).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from server.errors import ConfigError
from server.gpus import EngineUsage, Snapshot
from server.gpus.cpu import cpu_device
from server.placement import Device
from server.units import parse_bytes


@dataclass(frozen=True)
class SimGpu:
    total_bytes: int
    used_by_others: int = 0
    name: str = "Simulated GPU"


@dataclass(frozen=True)
class SimSpec:
    gpus: tuple[SimGpu, ...]
    engine_memory: dict[str, int] = field(default_factory=dict)  # model or "default" → bytes


def parse_spec(spec: str) -> SimSpec:
    """Parse a spec string or YAML file path (module doc); :class:`ConfigError` names what is wrong."""
    if Path(spec).is_file():
        try:
            doc = yaml.safe_load(Path(spec).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"simulate_gpus: {spec}: cannot read the layout: {exc}") from exc
        return _from_yaml(doc, spec)
    parts = spec.split(";")
    gpus: list[SimGpu] = []
    for item in filter(None, (p.strip() for p in parts[0].split(","))):
        m = re.fullmatch(r"(\d{1,3})\s*x\s*([^@]+?)(?:@(.+))?", item)
        if not m or not 1 <= int(m.group(1)) <= 64:
            raise ConfigError(f"simulate_gpus: {item!r} is not COUNTxSIZE[@USED] with 1-64 GPUs "
                              "(e.g. 2x80GiB@10GiB)")
        total = parse_bytes(m.group(2), f"simulate_gpus: {item}")
        used = parse_bytes(m.group(3), f"simulate_gpus: {item}") if m.group(3) else 0
        if used > total:
            raise ConfigError(f"simulate_gpus: {item}: used memory exceeds the total")
        gpus += [SimGpu(total, used)] * int(m.group(1))
    engine: dict[str, int] = {}
    for extra in parts[1:]:
        key, _, val = extra.partition("=")
        key = key.strip()
        if key == "engine":
            engine["default"] = parse_bytes(val.strip(), f"simulate_gpus: {extra}")
        elif key.startswith("engine."):
            engine[key[len("engine."):]] = parse_bytes(val.strip(), f"simulate_gpus: {extra}")
        else:
            raise ConfigError(f"simulate_gpus: unknown option {extra!r} (engine=… or engine.MODEL=…)")
    if not gpus:
        raise ConfigError("simulate_gpus: no GPUs described")
    return SimSpec(tuple(gpus), engine)


def _from_yaml(doc: dict, where: str) -> SimSpec:
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list) or not doc["gpus"]:
        raise ConfigError(f"{where}: gpus: must be a non-empty list")
    gpus = []
    for i, g in enumerate(doc["gpus"]):
        if not isinstance(g, dict):
            raise ConfigError(f"{where}: gpus[{i}]: must be a mapping with memory")
        gpus.append(SimGpu(parse_bytes(g.get("memory"), f"{where}: gpus[{i}].memory"),
                           parse_bytes(g.get("used_by_others", 0), f"{where}: gpus[{i}].used_by_others"),
                           str(g.get("name", "Simulated GPU"))))
    mem = doc.get("engine_memory") or {}
    if not isinstance(mem, dict):
        raise ConfigError(f"{where}: engine_memory: must map model names (or default) to bytes")
    engine = {str(k): parse_bytes(v, f"{where}: engine_memory.{k}") for k, v in mem.items()}
    return SimSpec(tuple(gpus), engine)


class SimulatedInventory:
    """An :class:`~server.gpus.Inventory` over a :class:`SimSpec`; engines' memory is derived from
    the engines the pool reports, so it follows starts and stops."""

    source = "simulated"

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec

    def engine_bytes(self, engine: EngineUsage) -> int:
        mem = self.spec.engine_memory
        return mem.get(engine.model, mem.get("default", engine.share_bytes))

    def snapshot(self, engines: Sequence[EngineUsage] = ()) -> Snapshot:
        used = [0] * len(self.spec.gpus)
        measured: dict[str, int] = {}
        for engine in engines:
            if not engine.ready or not engine.pids:
                continue
            take = self.engine_bytes(engine)
            for dev in engine.devices:
                if dev.startswith("cuda:") and int(dev[5:]) < len(used):
                    used[int(dev[5:])] += take
                    measured[engine.model] = take
        devices = tuple(
            Device(id=f"cuda:{i}", kind="cuda", index=i, name=g.name, total_bytes=g.total_bytes,
                   free_bytes=max(0, g.total_bytes - g.used_by_others - used[i]), seen_bytes=used[i])
            for i, g in enumerate(self.spec.gpus))
        return Snapshot(devices + (cpu_device(engines),), measured, source=self.source)
