"""``vramgate plan``: where every configured replica would go if all started now (an upstream
takes nothing here; a distributed model books only the Ray head's share)."""

from __future__ import annotations

import dataclasses

from server.config import ModelConfig, Settings
from server.estimate import requirement_for
from server.gpus import Snapshot
from server.placement import REMOTE, Booking, NoFit, Plan, Policy, Requirement, plan
from server.supervisor import device_kind, with_cpu_budget


def dry_run(settings: Settings, snap: Snapshot) -> list[tuple[Requirement, Plan | NoFit]]:
    """Place every configured replica in order on ``snap``, as a server starting all of them now
    would (each plan booked before the next). Reads the models' config.json and safetensors
    headers (``estimate.requirement_for``)."""
    snap = with_cpu_budget(snap, settings.cpu_memory_budget)
    policy = Policy(settings.placement, settings.gpu_headroom_bytes, allow_eviction=False)
    cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
    cpu_models = [m for m in settings.models if device_kind(m, snap) == "cpu"]
    bookings: list[Booking] = []
    out: list[tuple[Requirement, Plan | NoFit]] = []
    for model in settings.models:
        for i in range(model.engines):
            req = Requirement(model.name, 0, overhead_bytes=0, kind=REMOTE) if model.upstream(i) \
                else requirement_for(model, device_kind(model, snap),
                                     kv_sequences=settings.kv_cache_sequences,
                                     available_ram=cpu_dev.free_bytes, cpu_engines=len(cpu_models))
            result = plan(req, snap.devices, tuple(bookings), policy)
            if isinstance(result, Plan) and model.distributed is not None:
                result = dataclasses.replace(result, why=f"{result.why}; {distributed_note(model)}")
            if isinstance(result, Plan) and result.devices:
                bookings.append(Booking(f"{model.name}#{i}", result.devices,
                                        result.bytes_per_device, starting=True))
            out.append((req, result))
    return out


def distributed_note(model: ModelConfig) -> str:
    """What a distributed model's plan books and what Ray owns, in words."""
    assert model.distributed is not None
    tp, pp = model.tensor_parallel_size or 1, model.pipeline_parallel_size
    return (f"distributed over Ray at {model.distributed.address}: {tp} GPU(s) on each of {pp} "
            f"host(s); only this host's {tp} are booked here, Ray owns the rest")
