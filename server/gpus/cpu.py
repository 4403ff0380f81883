"""The CPU as a placement device: RAM total and available (psutil), and our engines' resident memory."""

from __future__ import annotations

from typing import Sequence

import psutil

from server.placement import Device


def tree_pids(root: int) -> frozenset[int]:
    """``root`` and every process below it (empty if it is gone)."""
    try:
        proc = psutil.Process(root)
        return frozenset([root, *(p.pid for p in proc.children(recursive=True))])
    except psutil.Error:
        return frozenset()


def rss_bytes(pids: frozenset[int]) -> int:
    """Resident memory of ``pids`` added up (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total


def cpu_device(engines: Sequence = ()) -> Device:
    """The CPU: ``total`` is installed RAM, ``free`` what the kernel reports available, ``seen`` the
    resident memory of the CPU engines among ``engines`` (each with ``pids`` and ``devices``)."""
    mem = psutil.virtual_memory()
    seen = sum(rss_bytes(e.pids) for e in engines if "cpu" in e.devices)
    return Device(id="cpu", kind="cpu", total_bytes=int(mem.total), free_bytes=int(mem.available),
                  seen_bytes=seen, name="CPU (RAM)")
