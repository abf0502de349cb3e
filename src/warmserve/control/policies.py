"""The control policies, as pure functions of plain records (the simulator and the live
controller call the same ones): replica planning and scoring, evict-aware placement of
prewarmed replicas, KV-cache reservation, the reactive autoscaler, GPU rebalancing for a
starving model, and the router."""

from __future__ import annotations

import functools
import math
from collections import Counter, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from warmserve.control.predictor import Forecast


@dataclass(frozen=True)
class ReplicaRequest:
    """One prewarmed replica a model would like, with its priority score."""

    model: str
    tp: int
    bytes_per_gpu: int
    score: float
    burst: bool


@dataclass(frozen=True)
class GpuCapacity:
    """What a GPU offers prewarms: free pool bytes (a free GPU) or lendable KV bytes."""

    gpu: int
    node: int
    capacity_bytes: int
    models: frozenset[str]  # models with a serving instance on this GPU


@dataclass(frozen=True)
class Placement:
    model: str
    gpus: tuple[int, ...]
    score: float


def replica_plan(model: str, forecast: Forecast, running: int, capacity: int, tp: int,
                 bytes_per_gpu: int, cold_start_s: float) -> list[ReplicaRequest]:
    """Foundation and burst replicas for the next window, scored as published:
    score_i = exp(-i / (f + b)) x cold-start time, burst replicas also x peak / avg."""
    foundation = max(math.ceil(forecast.avg_concurrency / capacity) - running, 0)
    burst = max(math.ceil(forecast.peak_concurrency / capacity) - running - foundation, 0)
    total = foundation + burst
    ratio = forecast.peak_concurrency / max(forecast.avg_concurrency, 1e-9)
    out = []
    for i in range(total):
        score = math.exp(-i / total) * cold_start_s
        is_burst = i >= foundation
        out.append(ReplicaRequest(model, tp, bytes_per_gpu, score * ratio if is_burst else score,
                                  is_burst))
    return out


@functools.cache
def aligned_groups(gpus_per_node: int, num_nodes: int, tp: int) -> tuple[tuple[int, ...], ...]:
    """GPU groups of size tp, aligned within a node: aligned groups always nest, so overlapping
    replicas of equal degree share all GPUs and smaller ones lie inside larger ones."""
    return tuple(tuple(node * gpus_per_node + start + j for j in range(tp))
                 for node in range(num_nodes) for start in range(0, gpus_per_node - tp + 1, tp))


def place_prewarms(requests: Sequence[ReplicaRequest], gpus: Sequence[GpuCapacity],
                   gpus_per_node: int, round_robin: bool = False) -> list[Placement]:
    """Evict-aware placement, replicas in score order. A replica may go on a group whose GPUs
    all have room and none holds the same model; among those, prefer groups it overlaps with no
    placed replica, then the smallest sum of overlapped scores (activating it later destroys as
    little as possible). `round_robin` is the ablation: the next fitting group in turn."""
    num_nodes = max(g.node for g in gpus) + 1 if gpus else 0
    room = {g.gpu: g.capacity_bytes for g in gpus}
    models = {g.gpu: set(g.models) for g in gpus}
    placed = dict.fromkeys(room, 0)  # replicas placed on each GPU so far
    placed_score = dict.fromkeys(room, 0.0)  # and the sum of their scores
    placements: list[Placement] = []
    cursor = 0
    order = sorted(requests, key=lambda r: -r.score)
    for req in order:
        def fits(grp: tuple[int, ...], req: ReplicaRequest = req) -> bool:
            return all(gpu in room and room[gpu] >= req.bytes_per_gpu
                       and req.model not in models[gpu] for gpu in grp)

        groups = aligned_groups(gpus_per_node, num_nodes, req.tp)
        if round_robin:
            fitting = [grp for grp in groups if fits(grp)]
            choice = fitting[cursor % len(fitting)] if fitting else None
            cursor += bool(fitting)
        else:
            choice = _least_overlapping(groups, fits, placed, placed_score)
        if choice is None:
            continue
        for gpu in choice:
            room[gpu] -= req.bytes_per_gpu
            models[gpu].add(req.model)
            placed[gpu] += 1
            placed_score[gpu] += req.score
        placements.append(Placement(req.model, choice, req.score))
    return placements


def _least_overlapping(groups, fits, placed: dict[int, int], placed_score: dict[int, float]
                       ) -> tuple[int, ...] | None:
    """The fitting group that overlaps no placed replica, else the one whose overlapped
    replicas' scores sum least (ties: the lowest GPUs). Groups come in ascending order, so the
    first fitting group with nothing placed on it is the answer."""
    best, best_key = None, None
    for grp in groups:
        if not fits(grp):
            continue
        if not any(placed[g] for g in grp):
            return grp
        key = sum(placed_score[g] for g in grp)
        if best_key is None or key < best_key:
            best, best_key = grp, key
    return best


def reserved_kv(total: int, requests: int, capacity: int) -> int:
    """KV-cache reservation: what an instance keeps free for its own growth, total x
    requests / B (in whatever unit `total` is: tokens or blocks)."""
    return math.ceil(total * requests / capacity)


def lendable_kv_tokens(total_tokens: int, used_tokens: int, running: int, capacity: int) -> int:
    """Free KV beyond the reservation: what an instance may lend."""
    return max(0, total_tokens - used_tokens - reserved_kv(total_tokens, running, capacity))


def should_reclaim_kv(total: int, free: int, lent: int, requests: int, blocked: int,
                     capacity: int) -> bool:
    """The reservation the other way: take lent blocks back when the free ones fall below
    it, or when the engine has requests blocked for want of blocks (one too long for what is
    free stays blocked whatever the reservation says)."""
    if not lent:
        return False
    return free < reserved_kv(total, requests, capacity) or blocked > 0


def autoscale(load: float, instances: int, capacity: int, up_ratio: float, down_ratio: float
              ) -> int:
    """Desired instance count for a model from its recent mean concurrency (published rule)."""
    cap = instances * capacity
    if load > up_ratio * cap:
        return max(instances + 1, math.ceil(load / up_ratio / capacity))
    if load < down_ratio * cap:
        return math.ceil(load / down_ratio / capacity)
    return instances


def prefill_aware_load(concurrency: float, prefill_load: float, capacity: int) -> float:
    """The load the autoscaler sees, counting prefill work as well as requests: an instance
    whose prefills take all its time (`prefill_load` = 1, in instances' worth of prefill
    time per second) is as full as one holding `capacity` requests. Long prompts arriving
    faster than an instance prefills them queue inside it, behind its prefills, where
    concurrency alone shows them as requests it is running."""
    return max(concurrency, prefill_load * capacity)


@dataclass(frozen=True)
class Holding:
    """A serving instance as the rebalancer sees it."""

    instance: int
    model: str
    gpus: tuple[int, ...]
    running: int


def instances_needed(load: float, capacity: int, up_ratio: float,
                     prefill_load: float = 0.0) -> int:
    """Instances that carry a model's load under the autoscaler's up-threshold: its
    concurrency at `capacity` requests each, and its prefill work (`prefill_load`, in
    instances' worth of prefill time) at one instance's worth each."""
    needed = math.ceil(load / (up_ratio * capacity)) if load > 0 else 0
    if prefill_load > 0:
        needed = max(needed, math.ceil(prefill_load / up_ratio))
    return needed


def requests_held(bound: int, kv_capacity: int, per_request: float) -> int:
    """Requests one instance holds at once: the engine's `bound`, unless its KV cache
    (`kv_capacity`) fills first with requests that take `per_request` of it each (tokens or
    blocks, the same unit for both). What another model could give up, or a starving model
    needs, is counted at this, not at the bound alone: a 7B's 80-GB GPU holds about 110
    requests of 1,000 tokens, not an engine's 256."""
    if per_request <= 0:
        return bound
    return max(1, min(bound, int(kv_capacity // per_request)))


def surplus_instances(load: float, instances: int, capacity: int, up_ratio: float,
                      forecast_avg: float = 0.0, prefill_load: float = 0.0) -> int:
    """Instances a model could give up and still stay under the autoscaler's up-threshold,
    for the larger of its recent load and its forecast average for this window (its forecast
    peak would leave almost nothing to take), and for its prefill work."""
    demand = max(load, forecast_avg)
    needed = instances_needed(demand, capacity, up_ratio, prefill_load)
    return max(0, instances - max(needed, 1 if demand > 0 else 0))


@dataclass(frozen=True)
class Demand:
    """What a model's load needs, as the overload control sees it."""

    model: str
    tp: int  # GPUs an instance takes
    instances: int  # instances its load needs (instances_needed)
    gpu_s_per_request: float  # what serving one of its requests costs, in GPU-seconds


def demand_of(model: str, tp: int, load: float, forecast_avg: float, prefill_load: float,
              capacity: int, up_ratio: float, gpu_s_per_request: float) -> Demand:
    """A model's need as surplus_instances counts it (the larger of its load and its forecast
    average, and its prefill work), for gpu_entitlement."""
    needed = instances_needed(max(load, forecast_avg), capacity, up_ratio, prefill_load)
    return Demand(model, tp, needed, gpu_s_per_request)


def demand_from_arrivals(model: str, tp: int, arrival_rate: float, gpu_s_per_request: float,
                         up_ratio: float) -> Demand:
    """A model's need from the work arriving: its requests per second times what one costs, in
    GPU-seconds, under the autoscaler's up-threshold; one instance while anything arrives.
    Unlike a need from concurrency (demand_of), it does not grow with the model's own backlog:
    a model whose instances fell behind does not look as if more GPUs would catch it up."""
    if arrival_rate <= 0:
        return Demand(model, tp, 0, gpu_s_per_request)
    gpus = arrival_rate * gpu_s_per_request / up_ratio
    return Demand(model, tp, max(1, math.ceil(gpus / tp)), gpu_s_per_request)


def gpu_entitlement(demands: Sequence[Demand], total_gpus: int) -> dict[str, int]:
    """GPUs each model may hold when they are scarce. While every model's need fits the
    cluster, each is entitled to its need. When they do not (overload), every model with load
    is entitled to one instance, and the rest go to the models whose requests cost the fewest
    GPU-seconds, cheapest first, up to their need: a GPU serves the most requests there.
    Rebalancing gives a starving model no GPUs beyond its entitlement, and takes them back
    from a model that holds more than its own."""
    wanted = {d.model: d.instances * d.tp for d in demands}
    if sum(wanted.values()) <= total_gpus:
        return wanted
    order = sorted(demands, key=lambda d: (d.gpu_s_per_request, d.model))
    out = {d.model: 0 for d in demands}
    left = total_gpus
    for d in order:
        if d.instances > 0 and left >= d.tp:
            out[d.model] = d.tp
            left -= d.tp
    for d in order:
        more = min(wanted[d.model] - out[d.model], left // d.tp * d.tp)
        if more > 0:
            out[d.model] += more
            left -= more
    return out


def peak_recent_load(recent: deque, now: float, load: float, horizon: float) -> float:
    """Record a model's load of this tick in `recent` and return its peak over the last
    `horizon` seconds: what rebalancing judges the model's surplus against. A group freed for a
    starving model stays reserved for `horizon` (rebalance_reserve_s), so an instance the model
    needed within that time would be wanted back before the move pays off.

    `recent` holds (time, load) pairs with loads decreasing: a load that a later, larger one
    outlives can never be the peak again, so it is dropped; the peak is the first pair."""
    while recent and recent[-1][1] <= load:
        recent.pop()
    recent.append((now, load))
    while recent[0][0] < now - horizon:
        recent.popleft()
    return recent[0][1]


@dataclass(frozen=True)
class DrainPlan:
    """What frees a group for a starving model: instances to drain, and instances to move
    first (a new instance of the same model starts on a group elsewhere, then the old one
    drains), so that their models keep their capacity. `room` are the surplus instances
    drained off those groups first, where no free group was left for a move."""

    group: tuple[int, ...]
    drain: tuple[int, ...]  # instance ids, including those moved
    moves: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (instance id, its new group)
    room: tuple[int, ...] = ()  # instance ids drained to make room for moves


def drain_for(groups: Sequence[tuple[int, ...]], holdings: Sequence[Holding],
              surplus: dict[str, int],
              free_groups: dict[int, Sequence[tuple[int, ...]]] | None = None,
              pinned: Collection[int] = (), make_room: bool = False) -> DrainPlan | None:
    """Free one of `groups` (aligned, of the starving model's size) for a model that has
    requests waiting and no free group (beyond the published algorithm, whose autoscaler only
    scales a model down for its own load: free GPUs scattered over a node cannot host a model
    that needs an aligned group).

    Each instance on a candidate group is drained if its model has surplus instances (counted
    per model), else moved to a free group of its size outside the candidate (`free_groups`
    by size; each used once). With `make_room`, a move with no free group left goes to an
    aligned group of its size outside the candidate that surplus instances alone hold; they
    are drained first (`room`; the caller must free their GPUs at once, as a hand-over
    does). So surplus scattered over several groups, none of which it frees alone, still
    adds up to one group. A group with a GPU in `pinned` (one that holds an instance the
    plan may not touch: too new to take, or still loading) is never chosen, nor made room
    on: draining the rest would not free it. The choice minimises the GPUs' worth of
    instances touched (never a large instance when small ones do), then the moves, then the
    running requests, then the instances."""
    on_gpu: dict[int, list[Holding]] = {}
    for h in holdings:
        for g in h.gpus:
            on_gpu.setdefault(g, []).append(h)
    best, best_key = None, None
    pinned = set(pinned)
    for group in groups:
        if pinned.intersection(group):
            continue
        taken = {h.instance: h for g in group for h in on_gpu.get(g, ())}
        if not taken:
            continue  # a free group needs no draining (the caller found none)
        found = _moves_for(group, sorted(taken.values(), key=lambda h: -len(h.gpus)),
                           surplus, free_groups or {}, on_gpu if make_room else {}, pinned)
        if found is None:
            continue
        moves, room = found
        touched = list(taken.values()) + room
        key = (sum(len(h.gpus) for h in touched), len(moves),
               sum(h.running for h in touched), len(touched), group)
        if best_key is None or key < best_key:
            best = DrainPlan(group, tuple(sorted(taken)), tuple(moves),
                             tuple(sorted(h.instance for h in room)))
            best_key = key
    return best


def _moves_for(group: tuple[int, ...], taken: list[Holding], surplus: dict[str, int],
               free_groups: dict[int, Sequence[tuple[int, ...]]],
               on_gpu: dict[int, list[Holding]], pinned: set[int]
               ) -> tuple[list[tuple[int, tuple[int, ...]]], list[Holding]] | None:
    """Moves for the instances on `group` beyond their models' surplus, and the surplus
    instances drained to make room for them (only where `on_gpu` is given); None if
    impossible."""
    spare = dict(surplus)
    to_move = []
    for h in taken:
        if spare.get(h.model, 0) > 0:
            spare[h.model] -= 1
        else:
            to_move.append(h)
    used = set(group)
    freed: set[int] = set()  # GPUs that room drained, not yet a move's target
    moves, room = [], []
    for h in to_move:
        size = len(h.gpus)
        target = next((grp for grp in free_groups.get(size, ()) if not used & set(grp)),
                      None)
        if target is None and on_gpu:
            target = _room_for(size, used, freed, spare, on_gpu, pinned, room)
        if target is None:
            return None
        used |= set(target)
        freed -= set(target)
        moves.append((h.instance, target))
    return moves, room


def _room_for(size: int, used: set[int], freed: set[int], spare: dict[str, int],
              on_gpu: dict[int, list[Holding]], pinned: set[int], room: list[Holding]
              ) -> tuple[int, ...] | None:
    """An aligned group of `size` outside `used` whose GPUs room drains already freed, or
    that surplus instances alone hold (drained now: added to `room`, their models' spare
    spent, their other GPUs to `freed`); None if there is none."""
    starts = sorted({g - g % size for g in set(on_gpu) | freed})
    for start in starts:
        block = tuple(range(start, start + size))
        if used.intersection(block) or pinned.intersection(block):
            continue
        drained = {h.instance: h for g in block if g not in freed for h in on_gpu.get(g, ())}
        if any(g not in freed and not on_gpu.get(g) for g in block):
            continue  # a GPU neither held nor freed: not known to exist or to be free
        need = Counter(h.model for h in drained.values())
        if any(spare.get(m, 0) < n for m, n in need.items()):
            continue
        if any(used.intersection(h.gpus) for h in drained.values()):
            continue  # draining it would touch the group being freed or a move's target
        for h in drained.values():
            spare[h.model] -= 1
            room.append(h)
            freed |= set(h.gpus)
        return block
    return None


def route(loads: Sequence[int], capacity: int) -> int | None:
    """The least-loaded instance with room, or None (queue and scale up)."""
    best = None
    for index, load in enumerate(loads):
        if load < capacity and (best is None or load < loads[best]):
            best = index
    return best
