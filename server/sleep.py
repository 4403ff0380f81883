"""vLLM's sleep mode as an eviction tier between ``ready`` and ``unloaded`` (GPU engines only).

An engine started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``
(``engines.engine_launch``) keeps its process, CUDA context and compiled graphs while it sleeps:

- level 1 moves its weights to host RAM and drops its KV cache; a wake copies them back;
- level 2 drops both; a wake reloads the weights from disk (``/wake_up?tags=weights``, then
  ``/collective_rpc`` ``reload_weights``, then ``/wake_up?tags=kv_cache``, as vLLM's RLHF
  examples do).

vLLM 0.32's routes (``vllm/entrypoints/serve/sleep``): ``POST /sleep?level=L&mode=wait`` answers
200 once the engine sleeps, after the requests in flight end (``mode=abort``, the default, would
kill them, so vramgate always sends ``wait``, and only to an engine with nothing in flight);
``POST /wake_up`` answers 200 ``{"status": "awake"}``, or 500 when the engine failed. A request
sent while it sleeps is accepted and hangs until a full wake, so the scheduler never grants one.
vramgate never forwards ``/sleep``, ``/wake_up``, ``/collective_rpc`` or ``/is_sleeping``: it has
no route for them.

vLLM's blog ("Zero-Reload Model Switching with vLLM Sleep Mode", blog.vllm.ai, 2025-10-26)
reports wakes 18–200× faster than a full reload of 30–100+ s; ``tests/gpu/sleep_check.py``
measures ours on a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

GiB = 2**30
# What a sleeping engine still holds on each GPU until NVML has measured it: its CUDA context,
# NCCL and cuBLAS workspaces and CUDA graphs' pools (about 1.5 GiB, issue #13's figure).
SLEEPING_BYTES = 3 * GiB // 2
SLEEP_TIMEOUT = 300.0  # seconds for a sleep (a level-1 sleep copies every weight to host RAM)


class SleepError(Exception):
    """A ``/sleep`` or ``/wake_up`` call that did not succeed (its status and body, or the
    connection error)."""


async def _post(session: aiohttp.ClientSession, engine: Any, path: str, timeout: float,
                body: dict | None = None) -> dict:
    url = engine.base_url.rstrip("/") + path
    try:
        async with session.post(url, json=body, headers=engine.headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise SleepError(f"POST {path} answered {resp.status}: {text[:300]}")
            try:
                return await resp.json(content_type=None) or {}
            except ValueError:
                return {}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SleepError(f"POST {path}: {exc.__class__.__name__}: {exc}") from exc


async def sleep_engine(session: aiohttp.ClientSession, engine: Any, level: int) -> float:
    """Put ``engine`` (its ``base_url`` and ``headers``) to sleep at ``level`` (1 or 2), waiting
    for requests in flight; returns the seconds it took. Raises :class:`SleepError`."""
    t0 = time.monotonic()
    await _post(session, engine, f"/sleep?level={level}&mode=wait", SLEEP_TIMEOUT)
    return time.monotonic() - t0


async def wake_engine(session: aiohttp.ClientSession, engine: Any, level: int,
                      timeout: float) -> float:
    """Wake ``engine`` from a sleep at ``level``; returns the seconds it took (``timeout``: for
    each call). Raises :class:`SleepError` when a call fails or the engine says it still sleeps."""
    t0 = time.monotonic()
    if level == 2:
        await _post(session, engine, "/wake_up?tags=weights", timeout)
        await _post(session, engine, "/collective_rpc", timeout, {"method": "reload_weights"})
        answer = await _post(session, engine, "/wake_up?tags=kv_cache", timeout)
    else:
        answer = await _post(session, engine, "/wake_up", timeout)
    if answer.get("status", "awake") != "awake":
        raise SleepError(f"the engine still sleeps after /wake_up: {answer}")
    return time.monotonic() - t0


def sleeping_bookings(awake_bytes: int, measured: int | None, weight_bytes: int | None,
                      level: int) -> tuple[int, int]:
    """What a sleeping engine books: (bytes on each of its GPUs, bytes of host RAM). On the GPU,
    NVML's ``measured`` figure for its process once slept, else :data:`SLEEPING_BYTES`, never more
    than it held awake (``awake_bytes``); in RAM, its weights (``weight_bytes``, all ranks
    together) at level 1, nothing at level 2 or when the size is unknown."""
    gpu = min(awake_bytes, measured if measured else SLEEPING_BYTES) if awake_bytes else (
        measured or SLEEPING_BYTES)
    return gpu, (weight_bytes or 0) if level == 1 else 0
