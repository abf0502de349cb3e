"""A discrete-event simulator of a multi-LLM GPU cluster, deterministic for a workload.

Requests are modelled at request level: an instance admits a request if it has fewer than B
running and KV room for its prompt plus output; prefills run one after another on an instance;
decode runs at the step time of the batch the request joins. Instances are created by the
system's policies (see systems.py) with the load time their memory tier costs. The controller
ticks every `control_interval_s`; forecasts and prewarm placement run every window.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from warmserve.config import PolicyConfig
from warmserve.control.policies import (
    GpuCapacity,
    Holding,
    ReplicaRequest,
    aligned_groups,
    autoscale,
    drain_for,
    lendable_kv_tokens,
    place_prewarms,
    replica_plan,
    surplus_instances,
)
from warmserve.control.predictor import Forecast, ModelForecaster
from warmserve.sim.profiles import DeviceProfile, ModelCost
from warmserve.sim.state import Cluster, Instance, Prewarm
from warmserve.sim.systems import SystemSpec
from warmserve.workload.builder import Workload

FINISH, READY, TICK, WINDOW, EXPIRE = range(5)


@dataclass(frozen=True)
class SimConfig:
    num_gpus: int
    gpus_per_node: int
    policy: PolicyConfig
    profile: DeviceProfile
    host_cache_bytes: int = 1 << 40  # pinned DRAM cache per node
    queue_timeout_s: float = 120.0  # a request waiting longer is dropped
    drain_s: float = 300.0  # after the last arrival, finish what runs


@dataclass
class _ModelState:
    index: int
    cost: ModelCost
    forecaster: ModelForecaster
    queue: deque = field(default_factory=deque)
    instances: list[Instance] = field(default_factory=list)
    concurrency: int = 0
    integral: float = 0.0
    last_change_s: float = 0.0
    tick_samples: deque = field(default_factory=deque)  # (time, integral), load_window_s long
    window_start_integral: float = 0.0
    window_peak: int = 0
    window_arrivals: int = 0
    forecast: Forecast | None = None
    load: float = 0.0  # the autoscaler's last 5-s mean concurrency


@dataclass
class SimResult:
    system: str
    duration_s: float
    ttft_s: np.ndarray  # per request; NaN if dropped
    tpot_s: np.ndarray
    dropped: np.ndarray  # bool
    model_index: np.ndarray
    gpu_seconds_busy: float
    cold_starts: int
    prewarm_hits: int
    keep_alive_hits: int
    kv_reclaims: int
    gpus_used: int
    timeline: dict = field(default_factory=dict)  # model -> {"t", "load", "forecast", ...}


class Simulator:
    def __init__(self, workload: Workload, costs: list[ModelCost], system: SystemSpec,
                 config: SimConfig) -> None:
        self.w = workload
        self.sys = system
        self.cfg = config
        self.B = config.policy.instance_capacity
        self.cluster = Cluster(config.num_gpus, config.gpus_per_node, config.profile.pool_bytes)
        samples = int(config.policy.load_window_s / config.policy.control_interval_s) + 1
        self.models = [_ModelState(i, c, ModelForecaster(workload.num_windows,
                                                         config.policy.error_correction_windows),
                                   tick_samples=deque(maxlen=samples))
                       for i, c in enumerate(costs)]
        for state, name in zip(self.models, workload.models, strict=True):
            if name in workload.history:
                h = workload.history[name]
                state.forecaster.seed({"avg_concurrency": h.avg_concurrency,
                                       "peak_concurrency": h.peak_concurrency,
                                       "rate_rps": h.rate_rps})
        n = workload.num_requests
        # Per-request state as Python lists: the hot path reads and writes single elements,
        # which is several times faster on lists than on numpy arrays.
        self.ttft = [math.nan] * n
        self.tpot = [math.nan] * n
        self.dropped = np.zeros(n, bool)
        self.arrival = workload.arrival_s.tolist()
        self.model_of = workload.model_index.tolist()
        self.input_tokens = workload.input_tokens.tolist()
        self.output_tokens = workload.output_tokens.tolist()
        self.need_tokens = (workload.input_tokens.astype(np.int64)
                            + workload.output_tokens).tolist()
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.ids = 0
        self.counts = {"cold": 0, "prewarm": 0, "keep": 0, "reclaim": 0, "rebalance": 0}
        self.node_cache: list[list[int]] = [[] for _ in range(self.cluster.num_nodes)]
        self.timeline: dict[str, dict[str, list]] = {
            name: {"t": [], "load": [], "forecast_peak": [], "instances": [], "prewarms": []}
            for name in workload.models}
        self.released: list[Instance] = []
        self.reserved: dict[int, tuple[int, float]] = {}  # gpu -> (model, until): rebalancing

    # --- the loop --------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None,
            stop_at_s: float | None = None) -> SimResult:
        """Simulate to the end (or only up to `stop_at_s`, leaving the state to inspect)."""
        self._start()
        arrivals = self.arrival
        end = self.w.spec.duration_s + self.cfg.drain_s
        if stop_at_s is not None:
            end = min(end, stop_at_s)
            arrivals = [t for t in arrivals if t < stop_at_s]
        i, n = 0, len(arrivals)
        next_progress = 0.0
        while True:
            next_event = self.events[0][0] if self.events else math.inf
            if i < n and arrivals[i] <= next_event:
                self.now = arrivals[i]
                self._arrive(i)
                i += 1
            elif next_event <= end and (i < n or self._busy()):
                t, _, kind, obj = heapq.heappop(self.events)
                self.now = t
                self._handle(kind, obj)
            else:
                break
            if progress and self.now >= next_progress:
                progress(min(self.now, self.w.spec.duration_s))
                next_progress = self.now + 10.0
        return self._result()

    def _busy(self) -> bool:
        return any(m.concurrency for m in self.models)

    def _push(self, t: float, kind: int, obj: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, obj))

    def _handle(self, kind: int, obj: object) -> None:
        if kind == FINISH:
            self._finish(*obj)
        elif kind == READY:
            self._drain_queue(self.models[obj.model])
        elif kind == TICK:
            self._tick()
        elif kind == WINDOW:
            self._window(obj)
        elif kind == EXPIRE:
            self._expire(obj)

    # --- start-up ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self.sys.colocate:
            self._place_colocated()
        else:
            for state in self.models:
                for _ in range(self._initial_instances(state)):
                    group = self._free_group(state.cost.tp) if not self.sys.dedicated else None
                    if group is None and self.sys.dedicated:
                        group = self._grow_cluster(state.cost.tp)
                    if group is None:
                        break
                    self._new_instance(state, group, ready_at=0.0)
        if not self.sys.dedicated and not self.sys.colocate:
            self._fill_host_cache()
        if self.sys.autoscale:
            self._push(self.cfg.policy.control_interval_s, TICK)
        self._push(0.0, WINDOW, 0)

    def _initial_instances(self, state: _ModelState) -> int:
        if self.sys.dedicated:
            peak = self.w.actual[self.w.models[state.index]].peak_concurrency.max()
            return max(1, math.ceil(peak / self.B))
        state.forecast = state.forecaster.forecast()
        return max(1, math.ceil(state.forecast.avg_concurrency / self.B))

    def _fill_host_cache(self) -> None:
        order = sorted(range(len(self.models)), key=lambda m: -self.w.spec.shares()[m])
        for cache in self.node_cache:
            used = 0
            for m in order:
                size = self.models[m].cost.weight_bytes
                if used + size <= self.cfg.host_cache_bytes:
                    cache.append(m)
                    used += size

    # --- requests ---------------------------------------------------------------------------

    def _arrive(self, i: int) -> None:
        state = self.models[self.model_of[i]]
        self._change_concurrency(state, +1)
        state.window_arrivals += 1
        if state.queue or not self._try_admit(state, i):
            state.queue.append(i)
            if self.sys.autoscale:  # the router queues and triggers a scale-up
                pending = sum(1 for inst in state.instances
                              if inst.accepting and inst.ready_at > self.now)
                if pending * self.B < len(state.queue):
                    self._scale_up(state, 1)

    def _try_admit(self, state: _ModelState, i: int) -> bool:
        """Route to the least-loaded live instance with room (KV room too)."""
        need = self.need_tokens[i]
        best, best_running, now = None, self.B, self.now
        for inst in state.instances:
            running = inst.running
            if running < best_running and inst.accepting and inst.ready_at <= now:
                best, best_running = inst, running
                if running == 0:
                    break
        if best is None:
            return False
        if self._kv_fits(best, need):
            self._admit(state, best, i, need)
            return True
        for inst in sorted(state.instances, key=lambda x: x.running):  # rare: KV is short
            if (inst is not best and inst.running < self.B and inst.ready_at <= self.now
                    and inst.accepting and self._kv_fits(inst, need)):
                self._admit(state, inst, i, need)
                return True
        return False

    def _kv_fits(self, inst: Instance, need: int) -> bool:
        if self.cluster.kv_room_tokens(inst, reclaim=False) >= need:
            return True
        if not self.sys.kv_lending or self.cluster.kv_room_tokens(inst, reclaim=True) < need:
            return False
        per_token = inst.cost.kv_bytes_per_token // inst.cost.tp
        for g in inst.gpus:  # take lent memory back: evict the lowest-scored prewarms there
            gpu = self.cluster.gpus[g]
            for p in sorted(gpu.prewarms, key=lambda p: p.score):
                if gpu.free_bytes() >= need * per_token:
                    break
                self._evict(p)
                self.counts["reclaim"] += 1
        return True

    def _admit(self, state: _ModelState, inst: Instance, i: int, need: int) -> None:
        cost = inst.cost
        slowdown = self._slowdown(inst)
        start = max(self.now, inst.prefill_free_at)
        first = start + cost.prefill_s(self.input_tokens[i]) * slowdown
        inst.prefill_free_at = first
        inst.running += 1
        self.cluster.change_kv(inst, need)
        tpot = cost.decode_step_s(inst.running) * slowdown
        out = self.output_tokens[i]
        self.ttft[i] = first - self.arrival[i]
        self.tpot[i] = tpot
        self._push(first + max(out - 1, 0) * tpot, FINISH, (state, inst, i, need))

    def _slowdown(self, inst: Instance) -> float:
        if not self.sys.colocate:
            return 1.0
        gpus = self.cluster.gpus
        if len(inst.gpus) == 1:
            busy = sum(1 for o in gpus[inst.gpus[0]].instances if o.running and o is not inst)
        else:
            busy = len({o for g in inst.gpus for o in gpus[g].instances
                        if o is not inst and o.running})
        return 1.0 + 0.75 * busy  # MPS overlaps kernels: better than pure time-sharing

    def _finish(self, state: _ModelState, inst: Instance, i: int, need: int) -> None:
        inst.running -= 1
        self.cluster.change_kv(inst, -need)
        self._change_concurrency(state, -1)
        self._drain_queue(state)
        if inst.draining and inst.running == 0:
            self._release(inst)

    def _drain_queue(self, state: _ModelState) -> None:
        while state.queue:
            i = state.queue[0]
            if self.now - self.arrival[i] > self.cfg.queue_timeout_s:
                state.queue.popleft()
                self.dropped[i] = True
                self._change_concurrency(state, -1)
                continue
            if not self._try_admit(state, i):
                return
            state.queue.popleft()

    def _change_concurrency(self, state: _ModelState, delta: int) -> None:
        state.integral += state.concurrency * (self.now - state.last_change_s)
        state.last_change_s = self.now
        state.concurrency += delta
        state.window_peak = max(state.window_peak, state.concurrency)

    # --- control ----------------------------------------------------------------------------

    def _tick(self) -> None:
        policy = self.cfg.policy
        for state in self.models:
            self._change_concurrency(state, 0)
            state.tick_samples.append((self.now, state.integral))
            old_t, old_i = state.tick_samples[0]  # the deque spans load_window_s
            span = self.now - old_t
            load = (state.integral - old_i) / span if span > 0 else state.concurrency
            state.load = load
            live = [inst for inst in state.instances if inst.accepting]
            desired = autoscale(load, len(live), self.B,
                                policy.scale_up_ratio, policy.scale_down_ratio)
            if state.queue and desired <= len(live) and all(i.ready_at <= self.now for i in live):
                desired = len(live) + 1  # requests wait and nothing is coming: scale up
            if desired > len(live):
                self._scale_up(state, desired - len(live))
            elif desired < len(live):
                self._scale_down(state, live, len(live) - desired)
        if self.now < self.w.spec.duration_s + self.cfg.drain_s:
            self._push(self.now + policy.control_interval_s, TICK)

    def _scale_down(self, state: _ModelState, live: list[Instance], count: int) -> None:
        protect = self.cfg.policy.new_instance_protect_s
        for inst in sorted(live, key=lambda i: i.running)[:count]:
            if self.now - inst.created_at < protect or inst.ready_at > self.now:
                continue
            inst.draining = True
            inst.refresh()
            if inst.running == 0:
                self._release(inst)

    def _scale_up(self, state: _ModelState, count: int) -> None:
        for _ in range(count):
            if not self._acquire(state):
                return

    def _acquire(self, state: _ModelState) -> bool:
        if self.sys.keep_alive and self._reuse_kept(state):
            return True
        if self.sys.prewarm and self._activate_prewarm(state):
            return True
        group = self._cold_group(state)
        if group is None:
            if self.sys.rebalance:
                self._rebalance(state)
            return False
        self._unreserve(group)
        self._evict_all(group)
        load_s = self._load_time(state, group)
        start = max([self.now] + [self.cluster.gpus[g].pcie_free_at for g in group])
        for g in group:
            self.cluster.gpus[g].pcie_free_at = start + load_s
        init = self.cfg.profile.engine_init_s if self.sys.engine_init else 0.0
        self._new_instance(state, group, ready_at=start + load_s + init)
        self.counts["cold"] += 1
        return True

    def _reuse_kept(self, state: _ModelState) -> bool:
        kept = [i for i in state.instances if i.kept_since is not None]
        if not kept:
            return False
        inst = kept[0]
        inst.kept_since = None
        inst.draining = False
        inst.refresh()
        inst.created_at = self.now
        self.counts["keep"] += 1
        return True

    def _activate_prewarm(self, state: _ModelState) -> bool:
        options = [p for g in self.cluster.gpus for p in g.prewarms
                   if p.model == state.index and p.gpus[0] == g.id
                   and all(self._usable(x, state.index) for x in p.gpus)]
        if not options:
            return False
        chosen = min(options, key=lambda p: p.ready_at)
        self._unreserve(chosen.gpus)
        self._evict(chosen)
        self._evict_all(chosen.gpus)
        ready = max(self.now, chosen.ready_at) + self.cfg.profile.activation_s
        self._new_instance(state, chosen.gpus, ready_at=ready)
        self.counts["prewarm"] += 1
        return True

    def _cold_group(self, state: _ModelState) -> tuple[int, ...] | None:
        tp = state.cost.tp
        groups = [grp for grp in aligned_groups(self.cluster.gpus_per_node,
                                                self.cluster.num_nodes, tp)
                  if all(self._usable(g, state.index) for g in grp)]
        if not groups and self.sys.keep_alive:
            groups = self._evict_kept_for(tp)
        if not groups:
            return None

        def cost(grp: tuple[int, ...]) -> tuple:
            node = self.cluster.gpus[grp[0]].node
            cached = state.index in self.node_cache[node]  # locality: DRAM-cached first
            prewarmed = sum(p.score for g in grp for p in self.cluster.gpus[g].prewarms)
            return (not cached, prewarmed, -self._packing(grp), grp)

        return min(groups, key=cost)

    def _usable(self, gpu: int, model: int) -> bool:
        """Free, and not reserved for another model's rebalancing."""
        if not self.cluster.gpus[gpu].is_free:
            return False
        owner = self.reserved.get(gpu)
        return owner is None or owner[0] == model or owner[1] <= self.now

    def _unreserve(self, group: tuple[int, ...]) -> None:
        for g in group:
            self.reserved.pop(g, None)

    def _rebalance(self, state: _ModelState) -> None:
        """No free group for a model with requests waiting: drain other models' surplus
        instances from one aligned group and reserve it (see policies.drain_for)."""
        live = sum(1 for i in state.instances if i.accepting)
        if not state.queue or state.load <= live * self.B:
            return  # not starving: requests wait only for a moment, or nothing waits
        if any(m == state.index and until > self.now for m, until in self.reserved.values()):
            return  # a group is already being drained for this model
        groups = [grp for grp in aligned_groups(self.cluster.gpus_per_node,
                                                self.cluster.num_nodes, state.cost.tp)
                  if not any(g in self.reserved and self.reserved[g][1] > self.now
                             for g in grp)]
        holdings, surplus, by_id = [], {}, {}
        protect = self.cfg.policy.new_instance_protect_s
        for other in self.models:
            if other is state:
                continue
            serving = [i for i in other.instances if i.accepting and i.ready_at <= self.now]
            demand = max(other.load, other.forecast.avg_concurrency if other.forecast else 0.0)
            surplus[self.w.models[other.index]] = surplus_instances(
                demand, len(serving), self.B, self.cfg.policy.scale_up_ratio)
            for inst in serving:
                if self.now - inst.created_at < protect:
                    continue
                holdings.append(Holding(inst.id, self.w.models[other.index], inst.gpus,
                                        inst.running))
                by_id[inst.id] = inst
        plan = drain_for(groups, holdings, surplus)
        if plan is None:
            return
        group, ids = plan
        until = self.now + self.cfg.policy.rebalance_reserve_s
        for g in group:
            self.reserved[g] = (state.index, until)
        for inst_id in ids:
            inst = by_id[inst_id]
            inst.draining = True
            inst.refresh()
            if inst.running == 0:
                self._release(inst)
        self.counts["rebalance"] += 1

    def _packing(self, group: tuple[int, ...]) -> int:
        """Busy GPUs in the aligned blocks around a group: packing small instances next to
        busy GPUs keeps large aligned groups free for large models (best fit)."""
        busy = 0
        size = len(group) * 2
        while size <= self.cluster.gpus_per_node:
            start = group[0] - group[0] % size
            busy += sum(1 for g in range(start, start + size) if not self.cluster.gpus[g].is_free)
            size *= 2
        return busy

    def _evict_kept_for(self, tp: int) -> list[tuple[int, ...]]:
        kept = sorted((i for s in self.models for i in s.instances if i.kept_since is not None),
                      key=lambda i: i.kept_since)
        for inst in kept:  # least recently used first
            self._remove_instance(inst)
            groups = [grp for grp in aligned_groups(self.cluster.gpus_per_node,
                                                    self.cluster.num_nodes, tp)
                      if all(self.cluster.gpus[g].is_free for g in grp)]
            if groups:
                return groups
        return []

    def _load_time(self, state: _ModelState, group: tuple[int, ...]) -> float:
        node = self.cluster.gpus[group[0]].node
        per_gpu = state.cost.weight_bytes_per_gpu
        profile = self.cfg.profile
        if state.index in self.node_cache[node] or self.sys.prewarm:
            return per_gpu / profile.h2d_bytes_per_s
        cache = self.node_cache[node]  # LRU: load from SSD, then keep in DRAM
        cache.append(state.index)
        while sum(self.models[m].cost.weight_bytes for m in cache) > self.cfg.host_cache_bytes:
            cache.pop(0)
        return per_gpu / profile.ssd_bytes_per_s

    def _new_instance(self, state: _ModelState, group: tuple[int, ...], ready_at: float) -> None:
        self.ids += 1
        inst = Instance(self.ids, state.index, tuple(group), state.cost, self.now, ready_at)
        state.instances.append(inst)
        self.cluster.place_instance(inst)
        if ready_at > self.now:
            self._push(ready_at, READY, inst)

    def _release(self, inst: Instance) -> None:
        self._release_weights(inst)
        owner = self.reserved.get(inst.gpus[0])
        if owner is not None and owner[1] > self.now:
            waiting = self.models[owner[0]]
            if waiting.queue and not any(i.accepting and i.ready_at > self.now
                                         for i in waiting.instances):
                self._scale_up(waiting, 1)

    def _release_weights(self, inst: Instance) -> None:
        state = self.models[inst.model]
        if self.sys.keep_alive:
            inst.kept_since = self.now
            inst.draining = False
            inst.refresh()
            self._push(self.now + self.cfg.policy.keep_alive_s, EXPIRE, inst)
            return
        self._remove_instance(inst)
        if self.sys.deactivate_to_prewarm:  # the weights stay where they are, prewarmed
            self.cluster.place_prewarm(
                Prewarm(state.index, inst.gpus, 0.0, self.now, inst.cost.weight_bytes_per_gpu))

    def _expire(self, inst: Instance) -> None:
        kept = inst.released_at is None and inst.kept_since is not None
        if kept and self.now - inst.kept_since >= self.cfg.policy.keep_alive_s - 1e-9:
            self._remove_instance(inst)

    def _remove_instance(self, inst: Instance) -> None:
        inst.released_at = self.now
        inst.kept_since = None
        inst.refresh()
        self.models[inst.model].instances.remove(inst)
        self.cluster.remove_instance(inst)
        self.released.append(inst)

    def _evict(self, prewarm: Prewarm) -> None:
        if self.cluster.remove_prewarm(prewarm) and prewarm.ready_at > self.now:
            for g in prewarm.gpus:  # cancelled mid-load: the link is free again
                gpu = self.cluster.gpus[g]
                gpu.pcie_free_at = min(gpu.pcie_free_at, self.now)

    def _evict_all(self, group: tuple[int, ...]) -> None:
        for g in group:
            for p in list(self.cluster.gpus[g].prewarms):
                self._evict(p)

    # --- windows: forecasts and prewarm placement ------------------------------------------

    def _window(self, index: int) -> None:
        window_s = self.w.window_s
        for state in self.models:
            if index > 0:
                self._change_concurrency(state, 0)
                avg = (state.integral - state.window_start_integral) / window_s
                state.forecaster.observe(avg, state.window_peak, state.window_arrivals / window_s)
                observed = Forecast(avg, state.window_peak, state.window_arrivals / window_s)
            else:
                observed = None
            state.window_start_integral = state.integral
            state.window_peak = state.concurrency
            state.window_arrivals = 0
            if self.sys.forecast or observed is None:
                state.forecast = state.forecaster.forecast()
            else:
                state.forecast = observed
            self._record(state)
        if self.sys.prewarm:
            self._plan_prewarms()
        if self.now < self.w.spec.duration_s:
            self._push(self.now + window_s, WINDOW, index + 1)

    def _record(self, state: _ModelState) -> None:
        line = self.timeline[self.w.models[state.index]]
        line["t"].append(self.now)
        line["load"].append(state.concurrency)
        line["forecast_peak"].append(state.forecast.peak_concurrency)
        line["instances"].append(sum(1 for i in state.instances if i.accepting))
        line["prewarms"].append(sum(1 for g in self.cluster.gpus for p in g.prewarms
                                    if p.model == state.index and p.gpus[0] == g.id))

    def _plan_prewarms(self) -> None:
        profile = self.cfg.profile
        requests: list[ReplicaRequest] = []
        for state in self.models:
            running = sum(1 for i in state.instances if i.accepting)
            cold_s = state.cost.weight_bytes_per_gpu / profile.h2d_bytes_per_s
            requests += replica_plan(self.w.models[state.index], state.forecast, running,
                                     self.B, state.cost.tp, state.cost.weight_bytes_per_gpu,
                                     cold_s)
        capacity = [GpuCapacity(g.id, g.node, self._prewarm_room(g),
                                frozenset(self.w.models[i.model] for i in g.instances))
                    for g in self.cluster.gpus]
        placements = place_prewarms(requests, capacity, self.cluster.gpus_per_node,
                                    self.sys.round_robin)
        wanted = {(self.w.models.index(p.model), p.gpus): p.score for p in placements}
        current = {(p.model, p.gpus): p for g in self.cluster.gpus for p in g.prewarms
                   if p.gpus[0] == g.id}
        for key, prewarm in current.items():
            if key in wanted:
                prewarm.score = wanted[key]
            else:
                self._evict(prewarm)
        for (model, gpus), score in wanted.items():
            if (model, gpus) not in current:
                self._start_prewarm(model, gpus, score)

    def _prewarm_room(self, gpu) -> int:
        if gpu.is_free:
            return gpu.free_bytes() + gpu.prewarmed_bytes()
        if not self.sys.kv_lending or any(i.kept_since is not None for i in gpu.instances):
            return 0
        inst = gpu.instances[0]
        per_token = inst.cost.kv_bytes_per_token // inst.cost.tp
        total = inst.kv_tokens + self.cluster.kv_room_tokens(inst, reclaim=True)
        lend = lendable_kv_tokens(total, inst.kv_tokens, inst.running, self.B)
        return lend * per_token

    def _start_prewarm(self, model: int, gpus: tuple[int, ...], score: float) -> None:
        cost = self.models[model].cost
        start = max([self.now] + [self.cluster.gpus[g].pcie_free_at for g in gpus])
        ready = start + cost.weight_bytes_per_gpu / self.cfg.profile.h2d_bytes_per_s
        for g in gpus:
            self.cluster.gpus[g].pcie_free_at = ready
        self.cluster.place_prewarm(Prewarm(model, gpus, score, ready, cost.weight_bytes_per_gpu))

    # --- static systems ---------------------------------------------------------------------

    def _free_group(self, tp: int) -> tuple[int, ...] | None:
        return next((grp for grp in aligned_groups(self.cluster.gpus_per_node,
                                                   self.cluster.num_nodes, tp)
                     if all(self.cluster.gpus[g].is_free for g in grp)), None)

    def _grow_cluster(self, tp: int) -> tuple[int, ...]:
        per_node = self.cluster.gpus_per_node
        used = len(self.cluster.gpus)
        groups = [grp for grp in aligned_groups(per_node, self.cluster.num_nodes, tp)
                  if all(self.cluster.gpus[g].is_free for g in grp)]
        if groups:
            return groups[0]
        self.cluster.add_gpus(per_node - used % per_node if used % per_node else per_node,
                              self.cfg.profile.pool_bytes)
        return self._grow_cluster(tp)

    def _place_colocated(self) -> None:
        """MuxServe-style: all models co-located, planned from average rates. Replicas go, one
        at a time, to the model with the most compute demand (rate share x parameters) per
        replica, on the group with the least weight memory used, while each GPU keeps a quarter
        of its pool for the shared KV cache; until no replica fits."""
        shares = self.w.spec.shares()
        demand = {s.index: shares[s.index] * s.cost.weight_bytes for s in self.models}
        replicas = dict.fromkeys(demand, 0)
        budget = 0.75  # share of a GPU's pool that weights may take
        open_models = set(demand)
        while open_models:
            m = max(open_models, key=lambda i: (demand[i] / (replicas[i] + 1), -i))
            state = self.models[m]
            groups = [grp for grp in aligned_groups(self.cluster.gpus_per_node,
                                                    self.cluster.num_nodes, state.cost.tp)
                      if all(self.cluster.gpus[g].used_bytes() + state.cost.weight_bytes_per_gpu
                             <= budget * self.cluster.gpus[g].pool_bytes
                             and all(i.model != m for i in self.cluster.gpus[g].instances)
                             for g in grp)]
            if not groups:
                open_models.discard(m)
                continue
            grp = min(groups, key=lambda grp: (
                sum(self.cluster.gpus[g].used_bytes() for g in grp), grp))
            self._new_instance(state, grp, ready_at=0.0)
            replicas[m] += 1

    # --- results ----------------------------------------------------------------------------

    def _result(self) -> SimResult:
        for state in self.models:  # anything still waiting was never served
            for i in state.queue:
                self.dropped[i] = True
        ttft, tpot = np.asarray(self.ttft), np.asarray(self.tpot)
        never = np.isnan(ttft) & ~self.dropped
        self.dropped |= never
        end = self.now
        busy = sum(((inst.released_at or end) - inst.created_at) * len(inst.gpus)
                   for inst in self.released + [i for s in self.models for i in s.instances])
        if self.sys.colocate:
            busy = len(self.cluster.gpus) * end
        used = sum(1 for g in self.cluster.gpus if g.instances) if self.sys.dedicated else len(
            self.cluster.gpus)
        return SimResult(self.sys.name, self.w.spec.duration_s, ttft, tpot,
                         self.dropped, self.w.model_index, busy, self.counts["cold"],
                         self.counts["prewarm"], self.counts["keep"], self.counts["reclaim"],
                         used, self.timeline)
