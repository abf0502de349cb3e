"""Control policies on hand-built inputs, and hypothesis properties of placement."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.control.policies import (
    Demand,
    DrainPlan,
    GpuCapacity,
    Holding,
    ReplicaRequest,
    aligned_groups,
    autoscale,
    demand_from_arrivals,
    drain_for,
    gpu_entitlement,
    instances_needed,
    lendable_kv_tokens,
    peak_recent_load,
    place_prewarms,
    prefill_aware_load,
    replica_plan,
    requests_held,
    route,
    should_reclaim_kv,
    surplus_instances,
)
from warmserve.control.predictor import Forecast

GB = 1 << 30


@pytest.mark.parametrize(
    ("avg", "peak", "running", "foundation", "burst"),
    [(0, 0, 0, 0, 0), (40, 100, 0, 2, 2), (40, 100, 1, 1, 2), (40, 100, 4, 0, 0),
     (64, 64, 0, 2, 0), (1, 90, 0, 1, 2)],
)
def test_replica_plan_counts(avg, peak, running, foundation, burst):
    plan = replica_plan("m", Forecast(avg, peak, 1.0), running, 32, 1, GB, 0.5)
    assert sum(not r.burst for r in plan) == foundation
    assert sum(r.burst for r in plan) == burst


def test_replica_scores_decay_and_burst_uses_peak_ratio():
    plan = replica_plan("m", Forecast(40, 100, 1.0), 0, 32, 1, GB, 2.0)
    total = len(plan)
    assert plan[0].score == pytest.approx(2.0)
    assert plan[1].score == pytest.approx(math.exp(-1 / total) * 2.0)
    assert plan[2].score == pytest.approx(math.exp(-2 / total) * 2.0 * 100 / 40)


def test_aligned_groups_nest():
    assert aligned_groups(8, 1, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert aligned_groups(8, 2, 2)[-1] == (14, 15)


def _gpus(n, per_node=8, room=80 * GB, models=None):
    return [GpuCapacity(g, g // per_node, room, frozenset((models or {}).get(g, ())))
            for g in range(n)]


def test_placement_avoids_overlap_then_minimises_destroyed_score():
    reqs = [ReplicaRequest("a", 1, 10 * GB, 5.0, False), ReplicaRequest("b", 1, 10 * GB, 4.0,
                                                                          False)]
    placed = place_prewarms(reqs, _gpus(2), 8)
    assert {p.gpus for p in placed} == {(0,), (1,)}  # no overlap while a free GPU exists
    reqs.append(ReplicaRequest("c", 1, 10 * GB, 1.0, False))
    placed = place_prewarms(reqs, _gpus(2), 8)
    assert next(p for p in placed if p.model == "c").gpus == (1,)  # overlaps the lower score


def test_placement_respects_instances_and_memory():
    reqs = [ReplicaRequest("a", 1, 30 * GB, 1.0, False)]
    gpus = [GpuCapacity(0, 0, 80 * GB, frozenset({"a"})), GpuCapacity(1, 0, 20 * GB,
                                                                       frozenset())]
    assert place_prewarms(reqs, gpus, 8) == []


def test_round_robin_ablation_cycles():
    reqs = [ReplicaRequest(m, 1, GB, 1.0, False) for m in "abc"]
    placed = place_prewarms(reqs, _gpus(4), 8, round_robin=True)
    assert [p.gpus for p in placed] == [(0,), (1,), (2,)]


REQUESTS = st.lists(st.builds(
    ReplicaRequest, st.sampled_from("abcde"), st.sampled_from([1, 2, 4]),
    st.integers(1, 40).map(lambda g: g * GB), st.floats(0.01, 10), st.booleans()), max_size=25,
    unique_by=lambda r: (r.model, r.score))


@settings(max_examples=200, deadline=None)
@given(REQUESTS, st.lists(st.integers(0, 80), min_size=8, max_size=16),
       st.dictionaries(st.integers(0, 15), st.sampled_from("abcde"), max_size=6))
def test_placement_invariants(requests, rooms, instance_models):
    gpus = [GpuCapacity(g, g // 8, rooms[g] * GB,
                        frozenset({instance_models[g]} if g in instance_models else ()))
            for g in range(len(rooms) - len(rooms) % 8 or 8)]
    placed = place_prewarms(requests, gpus, 8)
    used = {g.gpu: 0 for g in gpus}
    seen = set()
    for p in placed:
        req = next(r for r in requests if r.model == p.model and r.score == p.score)
        assert len(p.gpus) == req.tp and p.gpus[0] % req.tp == 0  # aligned
        assert len({g // 8 for g in p.gpus}) == 1  # inside one node
        for g in p.gpus:
            assert (p.model, g) not in seen  # never two replicas of one model on a GPU
            assert p.model not in gpus[g].models  # nor beside its own instance
            seen.add((p.model, g))
            used[g] += req.bytes_per_gpu
    for g in gpus:
        assert used[g.gpu] <= g.capacity_bytes  # never beyond free memory
    for p in placed:  # groups nest: any two overlapping groups, one contains the other
        for q in placed:
            a, b = set(p.gpus), set(q.gpus)
            if a & b:
                assert a <= b or b <= a


@pytest.mark.parametrize(
    ("load", "instances", "expected"),
    [(0, 0, 0), (10, 1, 1), (30, 1, 2), (100, 2, 4), (10, 2, 1), (15, 1, 1), (0, 3, 0)],
)
def test_autoscale(load, instances, expected):
    assert autoscale(load, instances, 32, 0.8, 0.5) == expected


def test_route_least_loaded_with_room():
    assert route([5, 2, 9], 32) == 1
    assert route([32, 32], 32) is None
    assert route([], 32) is None


@pytest.mark.parametrize(("total", "used", "running", "lend"),
                         [(1000, 0, 0, 1000), (1000, 100, 16, 400), (1000, 600, 32, 0)])
def test_kv_reservation(total, used, running, lend):
    assert lendable_kv_tokens(total, used, running, 32) == lend


@pytest.mark.parametrize(("free", "lent", "requests", "blocked", "reclaim"), [
    (10, 60, 3, 0, True),    # keep ceil(100 x 3 / 4) = 75 free: only 10 are
    (80, 20, 3, 0, False),   # 80 free: enough
    (30, 60, 1, 1, True),    # 30 >= 25 free, but a request is blocked (too long for 30)
    (30, 60, 1, 0, False),   # the same request merely queued for the next step
    (0, 0, 18, 18, False),   # nothing lent: nothing to take back
    (0, 100, 18, 18, True),  # the live deadlock: all lent, all waiting
])
def test_kv_reclaim(free, lent, requests, blocked, reclaim):
    assert should_reclaim_kv(100, free, lent, requests, blocked, 4) is reclaim


@pytest.mark.parametrize(("load", "instances", "surplus"),
                         [(0, 0, 0), (0, 2, 2), (10, 1, 0), (10, 3, 2), (26, 2, 0), (25, 2, 1),
                          (60, 3, 0), (52, 3, 0), (51, 3, 1)])
def test_surplus_stays_under_the_up_threshold(load, instances, surplus):
    assert surplus_instances(load, instances, 32, 0.8) == surplus
    kept = instances - surplus
    assert load <= 0.8 * 32 * kept or kept == instances  # never pushed over the threshold


def test_an_instance_holds_what_its_kv_cache_takes_up_to_the_engines_bound():
    assert requests_held(256, 111_579, 1_200.0) == 92  # a 7B's GPU, 1,200-token requests
    assert requests_held(256, 457_763, 1_200.0) == 256  # a 70B's four GPUs: the bound
    assert requests_held(256, 111_579, 0.0) == 256  # nothing seen yet: the bound
    assert requests_held(256, 1_000, 4_000.0) == 1  # one request, even if larger than the KV


def test_prefill_work_counts_as_load():
    # 10 requests but prefills that take 1.5 instances' time: as full as 48 requests
    assert prefill_aware_load(10.0, 1.5, 32) == 48.0
    assert prefill_aware_load(40.0, 0.5, 32) == 40.0  # concurrency is the larger
    assert instances_needed(40.0, 32, 0.8) == 2
    assert instances_needed(40.0, 32, 0.8, prefill_load=2.0) == 3  # ceil(2 / 0.8)
    assert instances_needed(0.0, 32, 0.8) == 0
    # one instance carries 10 at the engine's bound, but its prefills need three
    assert surplus_instances(10.0, 4, 256, 0.8, prefill_load=2.0) == 1
    assert surplus_instances(10.0, 4, 256, 0.8) == 3


def test_gpu_entitlement_is_the_need_while_it_fits():
    demands = [Demand("7b", 1, 3, 0.1), Demand("70b", 4, 2, 0.9)]
    assert gpu_entitlement(demands, 11) == {"7b": 3, "70b": 8}
    assert gpu_entitlement(demands, 64) == {"7b": 3, "70b": 8}


def test_gpu_entitlement_under_overload_serves_the_cheapest_requests_first():
    demands = [Demand("70b", 4, 3, 0.9), Demand("7b", 1, 6, 0.1), Demand("13b", 2, 2, 0.3),
               Demand("idle", 1, 0, 0.05)]
    # one instance each (4 + 1 + 2 = 7 of 16), then the 7B to its 6, the 13B to its 4,
    # and the 70B keeps the 4 left: one instance of the three it needs
    assert gpu_entitlement(demands, 16) == {"70b": 4, "7b": 6, "13b": 4, "idle": 0}
    # with 13 GPUs the 13B's second instance does not fit: its 2 GPUs go to nobody, as
    # the 70B needs 4 at a time
    assert gpu_entitlement(demands, 13) == {"70b": 4, "7b": 6, "13b": 2, "idle": 0}
    # fewer GPUs than one instance each: the cheapest models get theirs
    assert gpu_entitlement(demands, 3) == {"70b": 0, "7b": 1, "13b": 2, "idle": 0}
    # a cheaper model whose instance does not fit what is left leaves it to a dearer one
    wide = [Demand("a", 2, 1, 0.05), Demand("c", 8, 1, 0.1), Demand("d", 1, 3, 0.5)]
    assert gpu_entitlement(wide, 9) == {"a": 2, "c": 0, "d": 3}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(0, 6),
                          st.floats(0.01, 10.0)), min_size=1, max_size=6),
       st.integers(0, 40))
def test_gpu_entitlement_invariants(raw, total):
    demands = [Demand(f"m{i}", tp, n, cost) for i, (tp, n, cost) in enumerate(raw)]
    out = gpu_entitlement(demands, total)
    need = {d.model: d.instances * d.tp for d in demands}
    if sum(need.values()) <= total:
        assert out == need
        return
    assert sum(out.values()) <= total
    for d in demands:
        assert out[d.model] % d.tp == 0 and 0 <= out[d.model] <= need[d.model]
    left = total - sum(out.values())
    order = sorted(demands, key=lambda d: (d.gpu_s_per_request, d.model))
    for i, c in enumerate(order):
        if out[c.model] < need[c.model]:
            # a model short of its need could not have used what went, beyond their first
            # instance, to the dearer models after it, nor what is left over
            extras = sum(out[d.model] - d.tp for d in order[i + 1:] if out[d.model] > d.tp)
            assert left + extras < c.tp


def test_drain_for_frees_the_cheapest_group_of_surplus_instances():
    groups = aligned_groups(8, 1, 4)  # (0..3), (4..7)
    holdings = [Holding(1, "a", (0,), 10), Holding(2, "a", (1,), 2), Holding(3, "b", (2, 3), 5),
                Holding(4, "a", (4,), 1), Holding(5, "c", (6,), 0)]
    # a may give two instances, c one: group 4..7 (a's 1 + c's 0 running) beats 0..3 (b holds)
    assert drain_for(groups, holdings, {"a": 2, "c": 1}) == DrainPlan((4, 5, 6, 7), (4, 5))
    assert drain_for(groups, holdings, {"a": 2}) is None  # c cannot give its only instance
    # with b's surplus too, 0..3 qualifies but touches 4 GPUs of instances: still 4..7
    assert drain_for(groups, holdings, {"a": 3, "b": 1, "c": 1}).group == (4, 5, 6, 7)
    assert drain_for(groups, holdings, {"a": 3, "b": 1}) == DrainPlan((0, 1, 2, 3), (1, 2, 3))
    assert drain_for(groups, holdings, {"a": 1, "b": 1}) is None  # a's count is per model


def test_drain_for_moves_instances_without_surplus_to_free_gpus():
    groups = aligned_groups(8, 1, 4)
    holdings = [Holding(1, "a", (1,), 9), Holding(2, "b", (7,), 3)]  # GPUs 0, 2-6 free
    free = {1: [(0,), (2,), (3,), (4,), (5,), (6,)]}
    plan = drain_for(groups, holdings, {}, free)
    # either group needs one move; 4..7 has fewer running requests; b moves to GPU 0
    assert plan == DrainPlan((4, 5, 6, 7), (2,), ((2, (0,)),))
    assert drain_for(groups, holdings, {"b": 1}, free) == DrainPlan((4, 5, 6, 7), (2,))
    assert drain_for(groups, holdings, {}, {1: [(4,)]}) == DrainPlan(
        (0, 1, 2, 3), (1,), ((1, (4,)),))  # the only free GPU lies outside 0..3
    assert drain_for(groups, holdings, {}, {1: [(2,)]}) == DrainPlan(
        (4, 5, 6, 7), (2,), ((2, (2,)),))  # GPU 2 lies inside 0..3: only 4..7 works
    assert drain_for(groups, holdings, {}, {}) is None  # nowhere to move


def test_drain_for_never_picks_a_group_that_a_pinned_instance_keeps_busy():
    """An instance rebalancing may not touch (too new, or still loading) is no holding; the
    GPUs it sits on are pinned, and a group with one is never freed by draining the rest."""
    groups = aligned_groups(8, 1, 4)
    holdings = [Holding(1, "a", (0,), 1), Holding(2, "a", (4,), 9)]  # "b", new, sits on 1
    assert drain_for(groups, holdings, {"a": 2}) == DrainPlan((0, 1, 2, 3), (1,))
    assert drain_for(groups, holdings, {"a": 2}, pinned=[1]) == DrainPlan((4, 5, 6, 7), (2,))
    assert drain_for(groups, holdings, {"a": 2}, pinned=[1, 5]) is None


def test_drain_for_makes_room_for_a_move_by_draining_surplus_elsewhere():
    """Surplus scattered over two groups, neither of which it frees alone (a may give two of
    its four instances on 0..3, b one of its two on 4..7), and no free GPU: with make_room
    (the caller frees drained GPUs at once, as on a hand-over) b drains one instance, and its
    other moves onto 0..1, where two of a's are drained first."""
    groups = aligned_groups(8, 1, 4)
    holdings = [Holding(1, "a", (0,), 5), Holding(2, "a", (1,), 5), Holding(3, "a", (2,), 5),
                Holding(4, "a", (3,), 5), Holding(5, "b", (4, 5), 9), Holding(6, "b", (6, 7), 9)]
    surplus = {"a": 2, "b": 1}
    assert drain_for(groups, holdings, surplus, {}) is None
    plan = drain_for(groups, holdings, surplus, {}, make_room=True)
    # freeing 0..3 instead (a drains two, moves two onto b's 4..5) touches as many GPUs but
    # needs two moves
    assert plan == DrainPlan((4, 5, 6, 7), (5, 6), ((6, (0, 1)),), (1, 2))
    # each model's surplus is spent once, on the group or on the room
    assert drain_for(groups, holdings, {"a": 1, "b": 1}, {}, make_room=True) is None
    # a free group is used before any room is made
    plan = drain_for(groups, holdings, surplus, {1: [(8,), (9,)]}, make_room=True)
    assert plan == DrainPlan((0, 1, 2, 3), (1, 2, 3, 4), ((3, (8,)), (4, (9,))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([1, 2, 4]),
                          st.integers(0, 7), st.integers(0, 32)), max_size=8),
       st.dictionaries(st.sampled_from("abc"), st.integers(0, 3)), st.sampled_from([1, 2, 4]),
       st.sets(st.integers(0, 7), max_size=3), st.booleans())
def test_drain_for_invariants(raw, surplus, tp, pinned, make_room):
    holdings, used = [], set()
    for i, (model, size, slot, running) in enumerate(raw):
        gpus = tuple(range(slot - slot % size, slot - slot % size + size))
        if used & set(gpus):
            continue
        used |= set(gpus)
        holdings.append(Holding(i, model, gpus, running))
    pinned -= used  # a pinned GPU holds an instance that is no holding
    free = {size: [grp for grp in aligned_groups(8, 1, size) if not (used | pinned) & set(grp)]
            for size in (1, 2, 4)}
    plan = drain_for(aligned_groups(8, 1, tp), holdings, surplus, free, pinned, make_room)
    if plan is None:
        return
    assert not pinned & set(plan.group)  # draining the rest would not free the group
    by_id = {h.instance: h for h in holdings}
    room_gpus = {g for i in plan.room for g in by_id[i].gpus}
    assert make_room or not plan.room
    assert not set(plan.room) & set(plan.drain)
    assert not room_gpus & (set(plan.group) | pinned)  # room is made outside, never on pinned
    overlapping = {h.instance for h in holdings if set(h.gpus) & set(plan.group)}
    assert set(plan.drain) == overlapping and plan.drain  # exactly what blocks the group
    moved = {i for i, _ in plan.moves}
    targets = [set(t) for _, t in plan.moves]
    assert moved <= set(plan.drain)
    for i, target in plan.moves:
        size = len(next(h.gpus for h in holdings if h.instance == i))
        assert len(target) == size  # a group of its size, free or made room on...
        assert not set(target) & (used - room_gpus) and not set(target) & pinned
        assert not set(target) & set(plan.group)  # ...outside the freed one
    assert sum(len(t) for t in targets) == len(set().union(*targets))  # each used once
    for model in "abc":  # what is drained without a move, here or for room, is surplus
        assert sum(1 for h in holdings if h.instance in (set(plan.drain) - moved) | set(plan.room)
                   and h.model == model) <= surplus.get(model, 0)


def test_peak_recent_load_forgets_what_is_older_than_the_horizon():
    recent: deque = deque()
    assert peak_recent_load(recent, 0.0, 50.0, 60.0) == 50.0
    assert peak_recent_load(recent, 30.0, 10.0, 60.0) == 50.0
    assert peak_recent_load(recent, 60.0, 20.0, 60.0) == 50.0  # 0 s is exactly 60 s old: kept
    assert peak_recent_load(recent, 61.0, 5.0, 60.0) == 20.0
    assert list(recent) == [(60.0, 20.0), (61.0, 5.0)]  # 10 at 30 s can never be the peak


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=60), st.floats(0.5, 20))
def test_peak_recent_load_is_the_max_over_the_horizon(loads, horizon):
    recent: deque = deque()
    for i, load in enumerate(loads):
        now = i * 0.5
        expected = max(v for j, v in enumerate(loads[:i + 1]) if j * 0.5 >= now - horizon)
        assert peak_recent_load(recent, now, load, horizon) == expected


def test_a_need_from_arrivals_is_the_work_arriving_not_the_backlog():
    # 10 requests/s at 0.4 GPU-s each, under the 0.8 up-threshold: 5 GPUs, two TP4 instances
    assert demand_from_arrivals("70b", 4, 10.0, 0.4, 0.8).instances == 2
    assert demand_from_arrivals("7b", 1, 0.1, 0.1, 0.8).instances == 1  # anything: one
    assert demand_from_arrivals("idle", 1, 0.0, 0.1, 0.8).instances == 0
    # under overload the cheap model's need no longer swallows the cluster: 40 requests/s of
    # 0.1 GPU-s take 5 GPUs, whatever its queue, and the 70B's 8 fit beside them
    demands = [demand_from_arrivals("7b", 1, 40.0, 0.1, 0.8),
               demand_from_arrivals("70b", 4, 12.0, 0.5, 0.8)]
    assert gpu_entitlement(demands, 16) == {"7b": 5, "70b": 8}
