"""Placement at fleet scale: the real scheduler on 8 simulated GPUs and 20 models under random
10,000-event sequences never over-commits a GPU (issue #13).

``loadtest.fleet`` runs the real ``server.scheduler.Scheduler`` (decisions, planner, eviction,
books) with fake engines at the ``Engine`` boundary that hold, while they run, the memory vLLM
would take for the arguments they were started with, on an inventory whose free memory is what
they leave. :func:`assert_sound` is called after every event (once the scheduler has settled),
at every inventory read and every time an engine takes memory. The clock is the scheduler's
injected one: no time passes for real and nothing sleeps.
"""

from __future__ import annotations

import pytest

from server import decisions
from server.books import bookings
from server.placement import GiB
from loadtest.fleet import HEADROOM, MODELS, FakeEngine, Fleet, events, play

EVENTS = 10_000


def problems(fleet: Fleet, seen_tp: set[int] | None = None) -> list[str]:
    """Everything wrong with the fleet now: over-committed GPUs (by the books, and by what the
    engines really hold), engines placed where they cannot be, engines nobody booked.

    The books count every placed replica but those being evicted for one that waits for them to
    stop (named in its ``after``): the planner booked that one in their place, and it starts only
    once they are gone, which the check of what the engines hold sees."""
    gpus = fleet.gpus
    totals, others = gpus.totals, [g.used_by_others for g in gpus.spec.gpus]
    ids = {f"cuda:{i}": i for i in range(len(totals))}
    booked = [0] * len(totals)
    out: list[str] = []
    engines: set[int] = set()
    leaving = {key for book in fleet.pool.books.values() for rep in book.replicas for key in rep.after}
    for book in fleet.pool.books.values():
        cfg = book.config
        for rep in book.replicas:
            plan = rep.plan
            if plan is None:
                continue
            where = f"{rep.key} on {'+'.join(plan.devices)}"
            if any(d not in ids for d in plan.devices):
                out.append(f"{where}: no such device")
                continue
            index = [ids[d] for d in plan.devices]
            if len(set(index)) != len(index) or len(index) != plan.tensor_parallel_size:
                out.append(f"{where}: tensor parallel {plan.tensor_parallel_size} on {len(index)} devices")
            if cfg.tensor_parallel_size and plan.tensor_parallel_size != cfg.tensor_parallel_size:
                out.append(f"{where}: tensor parallel {plan.tensor_parallel_size}, "
                           f"configured {cfg.tensor_parallel_size}")
            if cfg.gpus and not set(index) <= set(cfg.gpus):
                out.append(f"{where}: outside its gpus {cfg.gpus}")
            if len({totals[i] for i in index}) != 1:
                out.append(f"{where}: tensor parallel over GPUs of different sizes")
            for i in index:
                booked[i] += rep.booked_bytes if rep.key not in leaving else 0
            if seen_tp is not None:
                seen_tp.add(plan.tensor_parallel_size)
            eng = rep.engine
            if isinstance(eng, FakeEngine) and eng in gpus.held:
                engines.add(id(eng))
                if eng.cuda != plan.cuda_indices or eng.tp != plan.tensor_parallel_size or \
                        f"{eng.fraction:.4f}" != f"{plan.gpu_memory_utilization:.4f}":
                    out.append(f"{where}: started on CUDA_VISIBLE_DEVICES={eng.cuda}, tensor parallel "
                               f"{eng.tp}, --gpu-memory-utilization {eng.fraction}; planned {plan}")
                if max(gpus.held[eng]) > rep.booked_bytes:
                    out.append(f"{where}: holds {max(gpus.held[eng]) / GiB:.3f} GiB a device, "
                               f"booked {rep.booked_bytes / GiB:.3f} GiB")
    used = gpus.used()
    for i, total in enumerate(totals):
        cap = total - HEADROOM
        if others[i] + booked[i] > cap:
            out.append(f"cuda:{i} over-committed in the books: {booked[i] / GiB:.3f} GiB booked + "
                       f"{others[i] / GiB:.3f} GiB of others > {cap / GiB:.3f} GiB (total - headroom)")
        if used[i] > cap:
            out.append(f"cuda:{i} over-committed in memory: {used[i] / GiB:.3f} GiB used "
                       f"> {cap / GiB:.3f} GiB (total - headroom)")
    orphans = [e.model for e in gpus.held if id(e) not in engines]
    if orphans:
        out.append(f"engines holding memory that no replica books: {orphans}")
    return out


def checker(seen_tp: set[int] | None = None):
    def check(fleet: Fleet) -> None:
        found = problems(fleet, seen_tp)
        assert not found, f"after event {fleet.tally.events}: " + "; ".join(found) + \
            f" (engines: {fleet.describe()})"
    return check


@pytest.mark.parametrize("seed,policy", [(1, "pack"), (2, "spread")])
def test_no_gpu_is_ever_over_committed_under_random_fleet_traffic(seed, policy):
    seen_tp: set[int] = set()
    tally = play(policy, events(seed, EVENTS), checker(seen_tp))
    assert tally.events == EVENTS
    assert tally.checks > 2 * EVENTS  # after every event, and at every start and inventory read
    # The sequence went through what it is meant to: evictions, rejects for no room, the reaper,
    # crashes and failed starts, tensor parallel placements.
    assert tally.evictions > 200 and tally.rejects > 20 and tally.idle_unloads > 500
    assert tally.crashes > 100 and tally.failed_starts > 20 and tally.unloads > 200
    assert seen_tp == {1, 2}
    assert any(m.tp == 2 for m in MODELS) and any(m.memory + 2 > 23 for m in MODELS)


def test_the_check_sees_an_over_commit_when_starting_engines_are_not_booked(monkeypatch):
    # The regression the books exist to prevent (cases C16): the planner no longer counts the
    # engines that are still starting. Bursts of requests place models while others start.
    def forgetful(books, waiting, exclude=None):
        return tuple(b for b in bookings(books, waiting, exclude) if not b.starting)
    monkeypatch.setattr(decisions, "bookings", forgetful)
    with pytest.raises(AssertionError, match="over-committed"):
        play("pack", events(1, 3000), checker())
