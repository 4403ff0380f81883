"""The NVML backend: what NVIDIA's driver reports about each GPU. The only importer of pynvml.

No driver, no library or no GPU gives an empty inventory, never an exception; an NVML failure after a
successful init becomes :class:`NvmlError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from server.gpus import EngineUsage, Snapshot
from server.gpus.cpu import cpu_device
from server.errors import NvmlError  # NVML's errors become ours here, and only here
from server.placement import Device


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory in bytes, utilisation in percent (0–100), temperature in
    °C, power in watts; ``processes`` maps each compute process id to its GPU memory in bytes."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    processes: dict[int, int] = field(default_factory=dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_inventory() -> list[GpuInfo]:
    """Every GPU NVML sees, in NVML index order; ``[]`` when there is no usable driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []

    def optional(fn, *args):
        try:
            return fn(*args)
        except pynvml.NVMLError:
            return None

    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = optional(pynvml.nvmlDeviceGetUtilizationRates, handle)
            temp = optional(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
            power = optional(pynvml.nvmlDeviceGetPowerUsage, handle)
            procs = optional(pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
            gpus.append(GpuInfo(
                index=i, uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)), total_bytes=int(mem.total),
                free_bytes=int(mem.free), used_bytes=int(mem.used),
                utilization_pct=util.gpu if util is not None else None, temperature_c=temp,
                power_w=power / 1000 if power is not None else None,
                processes={int(p.pid): int(p.usedGpuMemory or 0) for p in procs}))
        return gpus
    except pynvml.NVMLError as exc:
        raise NvmlError(f"NVML: {exc}") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def snapshot_from(gpus: Sequence[GpuInfo], engines: Sequence[EngineUsage], cpu: Device) -> Snapshot:
    """Devices and per-engine measured memory from NVML readings (pure).

    An engine's memory on a GPU is the sum over the compute processes of its process tree; its
    measured bytes per device is the largest such sum over its GPUs (tensor parallel ranks are equal).
    """
    measured: dict[str, int] = {}
    devices = []
    for gpu in gpus:
        seen = 0
        for engine in engines:
            mine = sum(b for pid, b in gpu.processes.items() if pid in engine.pids)
            seen += mine
            if mine:
                measured[engine.model] = max(measured.get(engine.model, 0), mine)
        devices.append(Device(id=f"cuda:{gpu.index}", kind="cuda", index=gpu.index, name=gpu.name,
                              total_bytes=gpu.total_bytes, free_bytes=gpu.free_bytes, seen_bytes=seen))
    return Snapshot(tuple(devices) + (cpu,), measured, source="nvml")


class NvmlInventory:
    """The real :class:`~server.gpus.Inventory`: NVML for GPUs, psutil for the CPU."""

    source = "nvml"

    def snapshot(self, engines: Sequence[EngineUsage] = ()) -> Snapshot:
        return snapshot_from(read_inventory(), engines, cpu_device(engines))
