"""The NVML backend: what NVIDIA's driver reports about each GPU. The only importer of pynvml.

No driver, no library or no GPU gives an empty inventory, never an exception; an NVML failure after a
successful init becomes :class:`NvmlError`.
"""

from __future__ import annotations

from dataclasses import dataclass


class NvmlError(RuntimeError):
    """NVML answered with an error while reading a GPU that it had listed."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory in bytes, utilisation in percent (0–100)."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_pct: int | None = None


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
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except pynvml.NVMLError:
                util = None
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(GpuInfo(index=i, uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                                name=name.decode() if isinstance(name, bytes) else name,
                                total_bytes=int(mem.total), free_bytes=int(mem.free),
                                used_bytes=int(mem.used), utilization_pct=util))
        return gpus
    except pynvml.NVMLError as exc:
        raise NvmlError(f"NVML: {exc}") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
