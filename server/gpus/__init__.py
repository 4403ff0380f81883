"""Device inventory: what each device has free, and how much of it vramgate's engines use.

``nvml.py`` (the only importer of pynvml) reads real NVIDIA GPUs; ``simulated.py`` describes layouts
we do not have (``--simulate-gpus 2x80GiB@20GiB,1x24GiB``); ``cpu.py`` adds the CPU (RAM) as a device,
so one planner decides CPU placement as well. Every backend answers :meth:`Inventory.snapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

from server.placement import Device

if TYPE_CHECKING:
    from server.gpus.simulated import SimSpec


@dataclass(frozen=True)
class EngineUsage:
    """One of vramgate's engines, as the inventory needs to see it: its process ids (the whole
    tree), the devices it was placed on, the share it was given (bytes per device) and whether it
    is ready (a simulated engine takes its memory when it is ready)."""

    model: str
    pids: frozenset[int]
    devices: tuple[str, ...]
    share_bytes: int
    ready: bool


@dataclass(frozen=True)
class Snapshot:
    """Devices (GPUs first, then the CPU) and, per model, the bytes per device its engine was
    measured using (NVML per-process memory); models not measurable are absent."""

    devices: tuple[Device, ...]
    measured: dict[str, int] = field(default_factory=dict)
    source: str = "nvml"


class Inventory(Protocol):
    """A source of device snapshots."""

    source: str

    def snapshot(self, engines: Sequence[EngineUsage] = ()) -> Snapshot:
        """Read every device now. Raises :class:`~server.gpus.nvml.NvmlError` on a driver error."""
        ...


def make_inventory(simulate: "str | SimSpec | None") -> Inventory:
    """The simulated inventory for a layout (a parsed ``SimSpec``, or its text: see
    ``simulated.parse_spec``), else real NVML. Raises ``ConfigError`` for a bad layout text."""
    if simulate:
        from server.gpus.simulated import SimulatedInventory, parse_spec
        return SimulatedInventory(parse_spec(simulate) if isinstance(simulate, str) else simulate)
    from server.gpus.nvml import NvmlInventory
    return NvmlInventory()
