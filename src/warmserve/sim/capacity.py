"""Capacity in the simulator: everything that creates or removes serving instances and
prewarmed replicas, following the system's policy set (systems.py).

Scale-up takes, in order, a kept-alive instance (reactive baseline), a prewarmed replica on
free GPUs (WarmServe: activation only), or a cold load onto a free aligned group — and, when no
group is free, WarmServe drains another model's surplus instances for the starving model
(rebalancing). Prewarms are planned every forecast window with the control policies.
"""

from __future__ import annotations

from warmserve.control.policies import (
    GpuCapacity,
    Holding,
    ReplicaRequest,
    demand_from_arrivals,
    demand_of,
    drain_for,
    gpu_entitlement,
    lendable_kv_tokens,
    place_prewarms,
    replica_plan,
    requests_held,
    surplus_instances,
)
from warmserve.sim.events import EXPIRE, READY, EventQueue
from warmserve.sim.profiles import ModelCost
from warmserve.sim.state import Cluster, Gpu, Instance, ModelState, Prewarm
from warmserve.sim.static import (
    PlannedModel,
    free_group,
    grow_cluster,
    plan_muxserve,
)
from warmserve.sim.systems import SystemSpec


class CapacityManager:
    def __init__(self, cluster: Cluster, models: list[ModelState], names: tuple[str, ...],
                 shares: list[float], system: SystemSpec, config, events: EventQueue) -> None:
        self.cluster = cluster
        self.models = models
        self.names = names
        self.shares = shares
        self.sys = system
        self.cfg = config  # SimConfig
        self.B = config.policy.instance_capacity
        self.events = events
        self.ids = 0
        self.counts = {"cold": 0, "prewarm": 0, "keep": 0, "reclaim": 0, "rebalance": 0,
                       "handed_over": 0}
        self.node_cache: list[list[int]] = [[] for _ in range(cluster.num_nodes)]
        self.released: list[Instance] = []
        self.reserved: dict[int, tuple[int, float]] = {}  # gpu -> (model, until): rebalancing
        self.handovers: dict[int, Instance] = {}  # new instance id -> the instance it replaces
        self.hand_over = None  # the simulator's: (instance) -> its running requests requeued

    @property
    def now(self) -> float:
        return self.events.now

    def place_initial(self, counts: list[int], planned: list[PlannedModel]) -> None:
        """Start-up: co-locate (MuxServe, from the models' average load `planned`), or give
        each model `counts[m]` instances (on new GPUs for the dedicated system), then fill the
        host caches."""
        if self.sys.colocate:
            for model, group, cost in plan_muxserve(self.cluster, planned, self.cfg.max_batch):
                self.new_instance(self.models[model], group, ready_at=0.0, cost=cost)
            return
        for state, count in zip(self.models, counts, strict=True):
            for _ in range(count):
                if self.sys.dedicated:
                    group = grow_cluster(self.cluster, state.cost.tp, self.cfg.profile.pool_bytes)
                else:
                    group = free_group(self.cluster, state.cost.tp)
                if group is None:
                    break
                self.new_instance(state, group, ready_at=0.0)
        if not self.sys.dedicated:
            self.fill_host_cache()

    def scale_up(self, state: ModelState, count: int) -> None:
        for _ in range(count):
            if not self.acquire(state):
                return

    def scale_down(self, state: ModelState, live: list[Instance], count: int) -> None:
        protect = self.cfg.policy.new_instance_protect_s
        for inst in sorted(live, key=lambda i: i.running)[:count]:
            if self.now - inst.active_since < protect or inst.ready_at > self.now:
                continue
            self._drain(inst)

    def acquire(self, state: ModelState) -> bool:
        if self.sys.keep_alive and self._reuse_kept(state):
            return True
        if self.sys.prewarm and self._activate_prewarm(state):
            return True
        group = self.cold_group(state)
        if group is None:
            if self.sys.rebalance:
                self._rebalance(state)
            return False
        self._load_on(state, group)
        return True

    def _load_on(self, state: ModelState, group: tuple[int, ...]) -> Instance:
        """A cold start on a free group: evict its prewarms, load the weights over each GPU's
        link (after what it is already loading), start the engine where the system must."""
        self._unreserve(group)
        self._evict_all(group)
        load_s = self._load_time(state, group)
        start = max([self.now] + [self.cluster.gpus[g].pcie_free_at for g in group])
        for g in group:
            self.cluster.gpus[g].pcie_free_at = start + load_s
        # a started engine (reactive baseline) or, in a universal worker, the model's runner
        # and its CUDA graphs
        profile = self.cfg.profile
        init = profile.engine_init_s if self.sys.engine_init else profile.runner_build_s
        self.counts["cold"] += 1
        return self.new_instance(state, group, ready_at=start + load_s + init)

    def _reuse_kept(self, state: ModelState) -> bool:
        kept = [i for i in state.instances if i.kept_since is not None]
        if not kept:
            return False
        inst = kept[0]
        inst.kept_since = None
        inst.draining = False
        inst.refresh()
        inst.active_since = self.now
        self.counts["keep"] += 1
        return True

    def _activate_prewarm(self, state: ModelState) -> bool:
        options = [p for g in self.cluster.gpus for p in g.prewarms
                   if p.model == state.index and p.gpus[0] == g.id
                   and all(self._usable(x, state.index) for x in p.gpus)]
        if not options:
            return False
        chosen = min(options, key=lambda p: p.ready_at)
        self._unreserve(chosen.gpus)
        self.evict(chosen)
        self._evict_all(chosen.gpus)
        ready = max(self.now, chosen.ready_at) + self.cfg.profile.activation_s
        self.new_instance(state, chosen.gpus, ready_at=ready)
        self.counts["prewarm"] += 1
        return True

    def cold_group(self, state: ModelState) -> tuple[int, ...] | None:
        tp = state.cost.tp
        groups = self._open_groups(tp, state.index)
        if not groups and self.sys.keep_alive:
            groups = self._evict_kept_for(tp)
        if not groups:
            return None
        gpus = self.cluster.gpus
        busy = [not gpu.is_free for gpu in gpus]

        def cost(grp: tuple[int, ...]) -> tuple:
            cached = state.index in self.node_cache[gpus[grp[0]].node]  # locality: cached first
            prewarmed = sum(p.score for g in grp for p in gpus[g].prewarms)
            return (not cached, prewarmed, -self._packing(grp, busy), grp)

        return min(groups, key=cost)

    def _open_groups(self, tp: int, model: int) -> list[tuple[int, ...]]:
        """The free aligned groups of `tp` GPUs that `model` may take: none of their GPUs
        reserved for another model's rebalancing (model -1: reserved for none)."""
        groups = self.cluster.free_groups(tp)
        if not self.reserved:
            return groups
        return [grp for grp in groups if all(self._usable(g, model) for g in grp)]

    def _usable(self, gpu: int, model: int) -> bool:
        """Free, and not reserved for another model's rebalancing."""
        if not self.cluster.gpus[gpu].is_free:
            return False
        owner = self.reserved.get(gpu)
        return owner is None or owner[0] == model or owner[1] <= self.now

    def _unreserve(self, group: tuple[int, ...]) -> None:
        for g in group:
            self.reserved.pop(g, None)

    def _rebalance(self, state: ModelState) -> None:
        """No free group for a model with requests waiting (at the router, or, with the
        prefill-aware signal, behind prefills that take more than all its instances' time):
        free one aligned group by draining other models' surplus instances and moving the
        rest to free GPUs elsewhere, and reserve it (see policies.drain_for). With overload
        control, a model gets no GPUs beyond its entitlement, and a model holding more than
        its own counts the difference as surplus (policies.gpu_entitlement)."""
        live = len(state.live())
        waiting = state.queue or (self.sys.prefill_aware and state.prefill_load > live)
        if not waiting or state.load <= live * self.B:
            return  # not starving: requests wait only for a moment, or nothing waits
        if any(m == state.index and until > self.now for m, until in self.reserved.values()):
            return  # a group is already being drained for this model
        groups = [grp for grp in self.cluster.groups(state.cost.tp)
                  if not any(g in self.reserved and self.reserved[g][1] > self.now
                             for g in grp)]
        # What the others can give: their instances beyond what carries their load at B each
        # (the autoscaler's target); at what an instance holds instead (the engine's bound, or
        # less where its KV cache fills first: _holds) where the router fills instances that
        # far (overflow) or the model has nothing serving at all.
        starved = not any(i.accepting for i in state.instances)
        bound = self.cfg.max_batch if self.sys.overflow or starved else self.B
        entitled = self._entitlement(bound) if self.sys.overload_control else None
        if entitled is not None and (live + 1) * state.cost.tp > entitled[state.index]:
            return  # the cluster is overloaded and this model's GPUs serve fewer requests
        holdings, surplus, by_id = self._donors(state, bound, entitled)
        free = {tp: self._open_groups(tp, -1) for tp in {len(h.gpus) for h in holdings}}
        pinned = [g for other in self.models if other is not state for i in other.instances
                  if i.accepting and i.id not in by_id for g in i.gpus]
        # surplus drained to make room for a move must free its GPUs at once: a hand-over
        plan = drain_for(groups, holdings, surplus, free, pinned,
                         make_room=self.sys.hand_over_on_drain)
        if plan is None:
            return
        until = self.now + self.cfg.policy.rebalance_reserve_s
        for g in plan.group:
            self.reserved[g] = (state.index, until)
        moved = dict(plan.moves)
        if plan.room:  # no one takes the moves' targets while the room's requests re-route
            for _, target in plan.moves:
                for g in target:
                    self.reserved[g] = (state.index, until)
            for inst_id in plan.room:
                self._drain(by_id[inst_id], hand_over=True)
        for inst_id in plan.drain:
            old = by_id[inst_id]
            if inst_id in moved:  # it serves on until its replacement is up, then drains
                new = self._load_on(self.models[old.model], moved[inst_id])
                self.handovers[new.id] = old
            else:
                self._drain(old, hand_over=True)
        self.counts["rebalance"] += 1

    def _donors(self, starving: ModelState, bound: int, entitled: list[int] | None
                ) -> tuple[list[Holding], dict[str, int], dict[int, Instance]]:
        """The other models' serving instances that rebalancing may touch (past their
        scale-down protection), each model's surplus, and the instances by id."""
        holdings, surplus, by_id = [], {}, {}
        protect = self.cfg.policy.new_instance_protect_s
        for other in self.models:
            if other is starving:
                continue
            serving = [i for i in other.instances if i.accepting and i.ready_at <= self.now]
            load, prefill = self._judged_load(other)
            spare = surplus_instances(
                load, len(serving), self._holds(other, bound), self.cfg.policy.scale_up_ratio,
                other.forecast.avg_concurrency if other.forecast else 0.0, prefill)
            if entitled is not None:  # beyond its entitlement counts as surplus too
                spare = max(spare, len(serving) - entitled[other.index] // other.cost.tp)
            surplus[self.names[other.index]] = spare
            for inst in serving:
                if self.now - inst.active_since >= protect:
                    holdings.append(Holding(inst.id, self.names[other.index], inst.gpus,
                                            inst.running))
                    by_id[inst.id] = inst
        return holdings, surplus, by_id

    def _judged_load(self, state: ModelState) -> tuple[float, float]:
        """The concurrency and prefill work rebalancing judges a model by: the latest, or
        with the look-back the peak of the last rebalance_reserve_s (which holds the latest)."""
        if self.sys.rebalance_lookback:
            return max(state.peak_load, state.load), max(state.peak_prefill, state.prefill_load)
        return state.load, state.prefill_load

    def _holds(self, state: ModelState, bound: int) -> int:
        """Requests one instance of the model holds (policies.requests_held): its KV cache, on
        GPUs holding nothing else, against the KV its running requests reserve each, on
        average (as the live controller measures it)."""
        running = tokens = 0
        for inst in state.instances:
            if inst.accepting:
                running += inst.running
                tokens += inst.kv_tokens
        if not running:
            return bound
        cost = state.cost
        kv_tokens = (self.cfg.profile.pool_bytes - cost.weight_bytes_per_gpu) // (
            cost.kv_bytes_per_token // cost.tp)
        return requests_held(bound, kv_tokens, tokens / running)

    def _entitlement(self, bound: int) -> list[int]:
        """GPUs each model may hold (policies.gpu_entitlement), by model index."""
        demands, up = [], self.cfg.policy.scale_up_ratio
        for m in self.models:
            name, cost = self.names[m.index], m.gpu_s_per_request(self.B)
            if self.sys.need_from_arrivals:
                demands.append(demand_from_arrivals(name, m.cost.tp, m.peak_rate, cost, up))
                continue
            load, prefill = self._judged_load(m)
            demands.append(demand_of(name, m.cost.tp, load,
                                     m.forecast.avg_concurrency if m.forecast else 0.0,
                                     prefill, self._holds(m, bound), up, cost))
        entitled = gpu_entitlement(demands, len(self.cluster.gpus))
        return [entitled[self.names[m.index]] for m in self.models]

    def _packing(self, group: tuple[int, ...], busy: list[bool]) -> int:
        """Busy GPUs (`busy`, by GPU) in the aligned blocks around a group: packing small
        instances next to busy GPUs keeps large aligned groups free for large models (best
        fit)."""
        near = 0
        size = len(group) * 2
        while size <= self.cluster.gpus_per_node:
            start = group[0] - group[0] % size
            near += sum(busy[start:start + size])
            size *= 2
        return near

    def _evict_kept_for(self, tp: int) -> list[tuple[int, ...]]:
        kept = sorted((i for s in self.models for i in s.instances if i.kept_since is not None),
                      key=lambda i: i.kept_since)
        for inst in kept:  # least recently used first
            self.remove_instance(inst)
            groups = self.cluster.free_groups(tp)
            if groups:
                return groups
        return []

    def _load_time(self, state: ModelState, group: tuple[int, ...]) -> float:
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

    def new_instance(self, state: ModelState, group: tuple[int, ...], ready_at: float,
                     cost: ModelCost | None = None) -> Instance:
        self.ids += 1
        inst = Instance(self.ids, state.index, tuple(group), cost or state.cost, self.now,
                        ready_at, self.cfg.max_batch if self.sys.colocate else self.B)
        state.instances.append(inst)
        self.cluster.place_instance(inst)
        if ready_at > self.now:
            self.events.push(ready_at, READY, inst)
        return inst

    def on_ready(self, inst: Instance) -> None:
        """An instance finished loading: the one it replaces (a rebalancing move) drains."""
        old = self.handovers.pop(inst.id, None)
        if old is not None and old.accepting:
            self._drain(old, hand_over=True)

    def _drain(self, inst: Instance, hand_over: bool = False) -> None:
        """Stop routing to an instance; release it once its requests are done, or at once
        where rebalancing drains it and the system hands them over (hand_over_on_drain)."""
        inst.draining = True
        inst.refresh()
        if hand_over and self.sys.hand_over_on_drain and inst.running:
            self.hand_over(inst)
        if inst.running == 0:
            self.release(inst)

    def release(self, inst: Instance) -> None:
        self._release_weights(inst)
        owner = self.reserved.get(inst.gpus[0])
        if owner is not None and owner[1] > self.now:
            waiting = self.models[owner[0]]
            if waiting.queue and not any(i.accepting and i.ready_at > self.now
                                         for i in waiting.instances):
                self.scale_up(waiting, 1)

    def _release_weights(self, inst: Instance) -> None:
        state = self.models[inst.model]
        if self.sys.keep_alive:
            inst.kept_since = self.now
            inst.draining = False
            inst.refresh()
            self.events.push(self.now + self.cfg.policy.keep_alive_s, EXPIRE, inst)
            return
        self.remove_instance(inst)
        if self.sys.deactivate_to_prewarm:  # the weights stay where they are, prewarmed
            self.cluster.place_prewarm(
                Prewarm(state.index, inst.gpus, 0.0, self.now, inst.cost.weight_bytes_per_gpu))

    def expire(self, inst: Instance) -> None:
        kept = inst.released_at is None and inst.kept_since is not None
        if kept and self.now - inst.kept_since >= self.cfg.policy.keep_alive_s - 1e-9:
            self.remove_instance(inst)

    def remove_instance(self, inst: Instance) -> None:
        inst.released_at = self.now
        inst.kept_since = None
        inst.refresh()
        self.models[inst.model].instances.remove(inst)
        self.cluster.remove_instance(inst)
        self.released.append(inst)

    def evict(self, prewarm: Prewarm) -> None:
        if self.cluster.remove_prewarm(prewarm) and prewarm.ready_at > self.now:
            for g in prewarm.gpus:  # cancelled mid-load: the link is free again
                gpu = self.cluster.gpus[g]
                gpu.pcie_free_at = min(gpu.pcie_free_at, self.now)

    def _evict_all(self, group: tuple[int, ...]) -> None:
        for g in group:
            for p in list(self.cluster.gpus[g].prewarms):
                self.evict(p)

    def plan_prewarms(self) -> None:
        profile = self.cfg.profile
        requests: list[ReplicaRequest] = []
        for state in self.models:
            running = len(state.live())
            cold_s = state.cost.weight_bytes_per_gpu / profile.h2d_bytes_per_s
            requests += replica_plan(self.names[state.index], state.forecast, running,
                                     self.B, state.cost.tp, state.cost.weight_bytes_per_gpu,
                                     cold_s)
        capacity = [GpuCapacity(g.id, g.node, self._prewarm_room(g),
                                frozenset(self.names[i.model] for i in g.instances))
                    for g in self.cluster.gpus]
        placements = place_prewarms(requests, capacity, self.cluster.gpus_per_node,
                                    self.sys.round_robin)
        wanted = {(self.names.index(p.model), p.gpus): p.score for p in placements}
        current = {(p.model, p.gpus): p for g in self.cluster.gpus for p in g.prewarms
                   if p.gpus[0] == g.id}
        for key, prewarm in current.items():
            if key in wanted:
                prewarm.score = wanted[key]
            else:
                self.evict(prewarm)
        for (model, gpus), score in wanted.items():
            if (model, gpus) not in current:
                self._start_prewarm(model, gpus, score)

    def _prewarm_room(self, gpu: Gpu) -> int:
        if gpu.is_free:
            return gpu.free_bytes() + gpu.prewarmed_bytes()
        if not self.sys.kv_lending or any(i.kept_since is not None for i in gpu.instances):
            return 0
        inst = gpu.instances[0]
        per_token = inst.kv_bytes_per_token
        total = inst.kv_tokens + self.cluster.kv_room_tokens(inst, reclaim=True)
        lend = lendable_kv_tokens(total, inst.kv_tokens, inst.running, self.B)
        return lend * per_token

    def _start_prewarm(self, model: int, gpus: tuple[int, ...], score: float) -> None:
        cost = self.models[model].cost
        start = max([self.now] + [self.cluster.gpus[g].pcie_free_at for g in gpus])
        loaded = start + cost.weight_bytes_per_gpu / self.cfg.profile.h2d_bytes_per_s
        for g in gpus:
            self.cluster.gpus[g].pcie_free_at = loaded
        ready = loaded + self.cfg.profile.runner_build_s  # the worker builds its runner next
        self.cluster.place_prewarm(Prewarm(model, gpus, score, ready, cost.weight_bytes_per_gpu))

    def fill_host_cache(self) -> None:
        order = sorted(range(len(self.models)), key=lambda m: -self.shares[m])
        for cache in self.node_cache:
            used = 0
            for m in order:
                size = self.models[m].cost.weight_bytes
                if used + size <= self.cfg.host_cache_bytes:
                    cache.append(m)
                    used += size
