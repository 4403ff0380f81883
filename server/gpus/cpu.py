"""The CPU as a placement device: RAM total and available (psutil), and our engines' memory.

An engine's memory is its processes' proportional set size (PSS, Linux's ``smaps_rollup``): each
shared page is split among the processes that map it. Adding up their resident sizes instead
counts the pages that vLLM's API server, engine core and worker share (torch's libraries) once per
process: on two CPU engines that came to more than the machine's whole used memory."""

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


def memory_bytes(pids: frozenset[int]) -> int:
    """The memory of ``pids`` added up: PSS where the OS reports it, else RSS (processes that
    are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            try:
                total += proc.memory_full_info().pss
            except (AttributeError, psutil.AccessDenied):  # no PSS here (not Linux): resident size
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def cpu_device(engines: Sequence = ()) -> Device:
    """The CPU: ``total`` is installed RAM, ``free`` what the kernel reports available, ``seen`` the
    memory (:func:`memory_bytes`) of the CPU engines among ``engines`` (each with ``pids`` and
    ``devices``)."""
    mem = psutil.virtual_memory()
    seen = sum(memory_bytes(e.pids) for e in engines if "cpu" in e.devices)
    return Device(id="cpu", kind="cpu", total_bytes=int(mem.total), free_bytes=int(mem.available),
                  seen_bytes=seen, name="CPU (RAM)")
