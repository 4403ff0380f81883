"""The scheduler's pure decisions on hand-made books: no tasks, no clock but ``now``."""

from __future__ import annotations

from server import decisions as d
from server.books import ModelBook, ModelState, WaiterBook
from server.config import ModelConfig
from server.errors import CapacityError, ModelNotFound
from server.modelfiles import UNKNOWN
from server.profile import profile


def book(name, ready=0, leases=0, **kw):
    cfg = ModelConfig(name=name, path="/x", replicas=max(1, ready), **kw)
    b = ModelBook(cfg, profile(cfg, UNKNOWN))
    for r in b.replicas[:ready]:
        r.state, r.leases = ModelState.READY, leases
    return b


def waiter(i, model, priority=5, arrived=0.0, deadline=900.0):
    return WaiterBook(i, model, priority, i, arrived, deadline)


def test_a_full_queue_is_refused_and_a_removed_model_is_not_found():
    b = book("a", ready=1, leases=2, max_concurrency=2, max_queue=1)
    assert d.admit(b, 0, "a") is None
    err = d.admit(b, 1, "a")
    assert isinstance(err, CapacityError) and err.code == "queue_full"
    b.retiring = True
    assert isinstance(d.admit(b, 0, "a"), ModelNotFound)


def test_grants_follow_priority_within_the_limit():
    b = book("a", ready=1, leases=1, max_concurrency=2)
    acts = d.step({"a": b}, [waiter(1, "a", 10), waiter(2, "a", 0), waiter(3, "a", 5)], now=1.0)
    assert [a for a in acts if isinstance(a, d.Grant)] == [d.Grant(2, "a#0")]


def test_batch_leases_are_limited_beside_other_requests_and_free_when_alone():
    alone = book("a", ready=1)
    ws = [waiter(i, "a", d.BATCH) for i in range(1, 4)]
    assert len([a for a in d.step({"a": alone}, ws, now=1.0) if isinstance(a, d.Grant)]) == 3
    busy = book("a", ready=1, leases=2)  # two interactive requests run
    grants = [a for a in d.step({"a": busy}, [waiter(9, "a", 0), *ws], now=1.0)
              if isinstance(a, d.Grant)]
    assert [g.waiter for g in grants] == [9]  # by default no batch line starts beside them
    one = d.Timeouts(batch_beside=1)
    grants = [a for a in d.step({"a": busy}, [waiter(9, "a", 0), *ws], now=1.0, timeouts=one)
              if isinstance(a, d.Grant)]
    assert [g.waiter for g in grants] == [9, 1]  # the interactive one, then one batch line
    busy.replicas[0].leases, busy.replicas[0].batch_leases = 3, 1  # one batch line runs already
    assert not [a for a in d.step({"a": busy}, ws, now=1.0, timeouts=one) if isinstance(a, d.Grant)]
    two = d.Timeouts(batch_beside=2)  # the setting allows one more
    assert len([a for a in d.step({"a": busy}, ws, now=1.0, timeouts=two)
                if isinstance(a, d.Grant)]) == 1


def test_a_waiter_for_a_slot_times_out_with_queue_timeout():
    b = book("a", ready=1, leases=1, max_concurrency=1, queue_timeout=30)
    assert d.step({"a": b}, [waiter(1, "a")], now=29.9) == []
    [refuse] = d.step({"a": b}, [waiter(1, "a")], now=30.0)
    assert isinstance(refuse, d.Refuse) and refuse.error.code == "queue_timeout"


def test_a_cold_start_waits_behind_a_better_waiter_that_waits_for_room():
    full, cold = book("full"), book("cold")
    full.nofit = CapacityError("no room")
    books = {"full": full, "cold": cold}
    ws = [waiter(1, "full", priority=0), waiter(2, "cold", priority=10)]
    assert not [a for a in d.step(books, ws, now=1.0) if isinstance(a, d.Start)]
    ws = [waiter(1, "full", priority=10), waiter(2, "cold", priority=0)]  # the better one may
    assert d.Start("cold", (0,)) in d.step(books, ws, now=1.0)


def test_idle_engines_are_reaped_after_their_ttl_and_next_wake_says_when():
    b = book("a", ready=1, ttl=60)
    b.replicas[0].last_used = 100.0
    assert d.step({"a": b}, [], now=159.0) == []
    assert d.next_wake({"a": b}, [], now=159.0) == 160.0
    assert d.step({"a": b}, [], now=160.0) == [d.Stop("a#0", "idle")]


def test_an_engine_past_its_ttl_that_a_waiter_is_granted_is_not_reaped_in_the_same_step():
    b = book("a", ready=1, ttl=60)
    b.replicas[0].last_used = 100.0
    assert d.step({"a": b}, [waiter(1, "a")], now=500.0) == [d.Grant(1, "a#0")]
