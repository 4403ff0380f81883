from collections import deque

import pytest

from server.admission import decide, parse_priority, rate_check


def test_decide():
    assert decide(0, 0, None, None) == "run"
    assert decide(1, 0, 2, 0) == "run"
    assert decide(2, 0, 2, 0) == "reject"
    assert decide(2, 0, 2, 1) == "queue"
    assert decide(1, 1, 2, 5) == "queue"  # someone queues before us: no overtaking
    assert decide(2, 5, 2, 5) == "reject"
    assert decide(2, 100, 2, None) == "queue"


def test_rate_check_sliding_window():
    times = deque([0.0, 10.0, 20.0])
    assert rate_check(times, 30.0, 4) == 0
    assert rate_check(times, 30.0, 3) == pytest.approx(30.0)  # the request at 0 leaves at 60
    assert rate_check(times, 61.0, 3) == 0 and list(times) == [10.0, 20.0]


def test_priority_names():
    assert parse_priority("interactive") < parse_priority(None) < parse_priority("batch")
    assert parse_priority("3") == 3 and parse_priority("nonsense") == parse_priority("normal")


def test_prefix_affinity_keeps_a_prompt_on_one_replica_until_it_is_overloaded():
    from server.lifecycle import ReplicaView, pick_replica

    views = [ReplicaView(f"m#{i}", "m", True, 0, 0.0) for i in range(4)]
    homes = {pick_replica(views, f"prompt {n}") for n in range(40)}
    assert len(homes) > 1  # different prefixes spread over the replicas
    home = pick_replica(views, "same prefix")
    assert all(pick_replica(views, "same prefix") == home for _ in range(5))
    busy = [ReplicaView(v.key, "m", True, 3 if v.key == home else 0, 0.0) for v in views]
    assert pick_replica(busy, "same prefix", slack=4) == home  # 3 more in flight: still home
    busier = [ReplicaView(v.key, "m", True, 4 if v.key == home else 0, 0.0) for v in views]
    assert pick_replica(busier, "same prefix", slack=4) != home  # 4 more: the least loaded
    assert pick_replica(views) == "m#0"  # no affinity: the least loaded, the first of equals
