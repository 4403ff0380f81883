"""GPU inventory. ``nvml.py`` is the only module that imports pynvml."""

from server.gpus.nvml import GpuInfo, NvmlError, read_inventory

__all__ = ["GpuInfo", "NvmlError", "read_inventory"]
