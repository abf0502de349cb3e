"""Simulated cluster state: GPUs with a memory pool, serving instances, prewarmed replicas, and
each model's runtime state.

Memory per GPU is one account: instance weights, the KV tokens its running requests hold, and
prewarmed weights. An instance's KV cache is elastic: it may use any free pool memory of its
GPUs, and (WarmServe) take back memory lent to prewarms by evicting them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from warmserve.control.policies import aligned_groups
from warmserve.control.predictor import Forecast, ModelForecaster
from warmserve.sim.profiles import ModelCost


@dataclass(eq=False)
class Prewarm:
    model: int
    gpus: tuple[int, ...]
    score: float
    ready_at: float
    bytes_per_gpu: int


@dataclass(eq=False)
class Instance:
    id: int
    model: int
    gpus: tuple[int, ...]
    cost: ModelCost
    created_at: float  # GPUs held from here (GPU-seconds count from it)
    ready_at: float
    max_batch: int  # requests it runs at once (the router's bound)
    running: int = 0
    kv_tokens: int = 0  # tokens reserved by running requests
    context_tokens: int = 0  # what their decode steps read: prompt + half the output each
    prefill_free_at: float = 0.0
    stall_s: float = 0.0  # prefills' delay to decodes, decayed (see note_stall)
    stall_at: float = 0.0
    draining: bool = False
    kept_since: float | None = None  # keep-alive: idle but loaded (reactive baseline)
    released_at: float | None = None
    accepting: bool = True  # live: not draining, not kept idle, not released (see refresh)
    active_since: float = -1.0  # last (re)start as a serving instance: scale-down protection
    on: tuple = ()  # its Gpu objects, set when placed (the request path reads them directly)
    requests: dict = field(default_factory=dict)  # running request -> KV it reserves; kept
    # only where a drain hands requests over (SystemSpec.hand_over_on_drain)

    def __post_init__(self) -> None:
        if self.active_since < 0:
            self.active_since = self.created_at
        self.kv_bytes_per_token = self.cost.kv_bytes_per_token // self.cost.tp  # on each GPU

    def note_stall(self, now: float, stall_s: float, window_s: float) -> float:
        """Add a prefill's delay to the decodes and return the recent delay per second: an
        exponentially decayed sum over `window_s`."""
        if now > self.stall_at:
            self.stall_s *= math.exp((self.stall_at - now) / window_s)
            self.stall_at = now
        self.stall_s += stall_s
        return self.stall_s / window_s

    def refresh(self) -> None:
        """Recompute `accepting` after changing draining, kept_since or released_at (the
        router reads it on every request, so it is stored, not derived)."""
        self.accepting = (not self.draining and self.kept_since is None
                          and self.released_at is None)


@dataclass(eq=False)
class Gpu:
    id: int
    node: int
    pool_bytes: int
    instances: list[Instance] = field(default_factory=list)
    prewarms: list[Prewarm] = field(default_factory=list)
    pcie_free_at: float = 0.0
    used: int = 0  # bytes: instance weights + their KV in use + prewarmed weights

    def used_bytes(self) -> int:
        return self.used

    def free_bytes(self) -> int:
        return self.pool_bytes - self.used

    def prewarmed_bytes(self) -> int:
        return sum(p.bytes_per_gpu for p in self.prewarms)

    @property
    def is_free(self) -> bool:
        return not self.instances


class Cluster:
    def __init__(self, num_gpus: int, gpus_per_node: int, pool_bytes: int) -> None:
        self.gpus_per_node = gpus_per_node
        self.gpus = [Gpu(i, i // gpus_per_node, pool_bytes) for i in range(num_gpus)]
        self._groups: dict[int, tuple[tuple[int, ...], ...]] = {}  # by tp; see groups
        self._free_in_node = self._count_free()  # GPUs without instances, per node

    def _count_free(self) -> list[int]:
        free = [0] * self.num_nodes
        for gpu in self.gpus:
            free[gpu.node] += gpu.is_free
        return free

    @property
    def num_nodes(self) -> int:
        return -(-len(self.gpus) // self.gpus_per_node)

    def groups(self, tp: int) -> tuple[tuple[int, ...], ...]:
        """Every aligned group of `tp` GPUs within a node (see policies.aligned_groups); a
        last node with fewer GPUs has only the groups it holds."""
        groups = self._groups.get(tp)
        if groups is None:
            groups = aligned_groups(self.gpus_per_node, self.num_nodes, tp)
            if len(self.gpus) % self.gpus_per_node:
                groups = tuple(grp for grp in groups if grp[-1] < len(self.gpus))
            self._groups[tp] = groups
        return groups

    def free_groups(self, tp: int) -> list[tuple[int, ...]]:
        """The aligned groups of `tp` GPUs that hold no instance (prewarms they may hold).
        Nodes with fewer than `tp` free GPUs are skipped whole: a full cluster answers fast."""
        per_node = self.gpus_per_node // tp
        free, gpus = self._free_in_node, self.gpus
        groups = self.groups(tp)
        return [grp for node in range(len(free)) if free[node] >= tp
                for grp in groups[node * per_node:(node + 1) * per_node]
                if all(gpus[g].is_free for g in grp)]

    def add_gpus(self, count: int, pool_bytes: int) -> None:
        start = len(self.gpus)
        self.gpus += [Gpu(i, i // self.gpus_per_node, pool_bytes)
                      for i in range(start, start + count)]
        self._groups.clear()
        self._free_in_node = self._count_free()

    def kv_room_tokens(self, inst: Instance, reclaim: bool) -> int:
        """Tokens the instance can still take: free memory, plus prewarmed bytes if reclaim."""
        if reclaim:
            room = min(gpu.free_bytes() + gpu.prewarmed_bytes() for gpu in inst.on)
        else:  # asked on every request: a plain loop is twice as fast as min() over a generator
            room = math.inf
            for gpu in inst.on:
                free = gpu.pool_bytes - gpu.used
                if free < room:
                    room = free
        return max(0, room // inst.kv_bytes_per_token)

    # Every change of GPU memory goes through these, which keep `Gpu.used` exact.

    def place_instance(self, inst: Instance) -> None:
        inst.on = tuple(self.gpus[g] for g in inst.gpus)
        for gpu in inst.on:
            self._free_in_node[gpu.node] -= gpu.is_free
            gpu.instances.append(inst)
            gpu.used += inst.cost.weight_bytes_per_gpu

    def remove_instance(self, inst: Instance) -> None:
        per_token = inst.kv_bytes_per_token
        for gpu in inst.on:
            gpu.instances.remove(inst)
            self._free_in_node[gpu.node] += gpu.is_free
            gpu.used -= inst.cost.weight_bytes_per_gpu + inst.kv_tokens * per_token

    def change_kv(self, inst: Instance, tokens: int) -> None:
        inst.kv_tokens += tokens
        delta = tokens * inst.kv_bytes_per_token
        for gpu in inst.on:
            gpu.used += delta

    def place_prewarm(self, prewarm: Prewarm) -> None:
        for g in prewarm.gpus:
            self.gpus[g].prewarms.append(prewarm)
            self.gpus[g].used += prewarm.bytes_per_gpu

    def remove_prewarm(self, prewarm: Prewarm) -> bool:
        """Remove a prewarm from its GPUs; False if it was not there."""
        if prewarm not in self.gpus[prewarm.gpus[0]].prewarms:
            return False
        for g in prewarm.gpus:
            self.gpus[g].prewarms.remove(prewarm)
            self.gpus[g].used -= prewarm.bytes_per_gpu
        return True


@dataclass
class ModelState:
    """One model's runtime state: its queue, instances, and the load the controller sees."""

    index: int
    cost: ModelCost
    forecaster: ModelForecaster
    queue: deque = field(default_factory=deque)  # request indices waiting for an instance
    instances: list[Instance] = field(default_factory=list)
    concurrency: int = 0  # requests in the system (queued or running)
    integral: float = 0.0  # ∫ concurrency dt up to last_change_s
    last_change_s: float = 0.0
    tick_samples: deque = field(default_factory=deque)  # (time, integral, prefill work,
    # arrivals)
    prefill_work: float = 0.0  # seconds of prefill (on one instance) of every arrival so far
    arrived: int = 0
    output_tokens: int = 0  # of every arrival so far
    prompt_tokens: int = 0
    arrival_rate: float = 0.0  # requests/s over the last 5 s
    recent_rates: deque = field(default_factory=deque)  # for policies.peak_recent_load
    peak_rate: float = 0.0
    window_start_integral: float = 0.0
    window_peak: int = 0
    window_start_arrived: int = 0  # `arrived` when the forecast window opened
    forecast: Forecast | None = None
    load: float = 0.0  # the autoscaler's last 5-s mean concurrency
    recent_loads: deque = field(default_factory=deque)  # for policies.peak_recent_load
    peak_load: float = 0.0  # the peak load of the last rebalance_reserve_s: what rebalancing
    # judges this model's surplus against
    prefill_load: float = 0.0  # instances' worth of prefill arriving, over the last 5 s
    recent_prefill: deque = field(default_factory=deque)  # for policies.peak_recent_load
    peak_prefill: float = 0.0

    def gpu_s_per_request(self, batch: int) -> float:
        """What one of its requests costs so far, in GPU-seconds: its mean prefill plus its
        mean output decoded in a batch of `batch`, times the GPUs an instance takes."""
        if not self.arrived:
            return 0.0
        prompt, output = self.prompt_tokens / self.arrived, self.output_tokens / self.arrived
        step = self.cost.batch_step_s(batch, prompt, output)
        return self.cost.tp * (self.prefill_work / self.arrived + output * step / batch)

    def live(self) -> list[Instance]:
        """Instances accepting requests (ready or still loading)."""
        return [i for i in self.instances if i.accepting]
