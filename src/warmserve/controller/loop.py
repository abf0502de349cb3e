"""The live controller: the simulator's policies applied to real workers.

Every `control_interval_s` it samples each model's concurrency (requests in flight at the
router) and, with the prefill-aware signal, the prefill work its engines are given (prompt
tokens per second × their measured seconds per prefilled token), runs the published autoscaler
on the load over `load_window_s`, and activates or deactivates instances; when no worker can
take a model that needs more, it drains other models' surplus instances off one worker for it,
or off an aligned group of workers for a split model (rebalancing, as the simulator, with its
overload control). Activations run in the background, one per model at a time, so that a
slow one (a cold load takes seconds to minutes) holds up no other model's scaling and no KV
reclaim; a tick records those that finished. Every `window_s` it feeds the forecaster the
window that closed, plans foundation and burst replicas for the next one, and prewarms the
ones that have no active instance behind them on workers where the model is not resident
yet. The decisions are the pure functions of `warmserve.control`; this loop only gathers the
snapshot and applies the actions through the cluster's worker clients. Each model's load
records are `controller/load.py`; lending idle KV blocks and taking them back,
`controller/kv.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from warmserve.cluster.manager import LocalCluster, NoCapacity
from warmserve.config import ModelConfig, WarmServeConfig
from warmserve.control.policies import (
    GpuCapacity,
    Holding,
    ReplicaRequest,
    autoscale,
    demand_from_arrivals,
    demand_of,
    drain_for,
    gpu_entitlement,
    peak_recent_load,
    place_prewarms,
    prefill_aware_load,
    replica_plan,
    requests_held,
    surplus_instances,
)
from warmserve.control.predictor import ModelForecaster
from warmserve.controller.kv import KvReservation
from warmserve.controller.load import ModelLoad
from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.engine.checkpoint import DTYPES, read_arch, resolve_checkpoint
from warmserve.engine.parallel import Shard
from warmserve.sim.systems import SystemSpec, get_system
from warmserve.worker.rpc import WorkerGone
from warmserve.worker.worker import Refused
from warmserve.workload.traces import load_history

log = logging.getLogger(__name__)
KV_CHECK_S = 0.1  # how often workers lending KV are checked for blocked requests, between ticks

H2D_BYTES_PER_S = 52e9  # cold-start time in replica scores: weight bytes over pinned H2D


def _activation_executor(num_models: int) -> Executor:
    """Where activations run: a thread per model at most (the cluster activates one instance
    of a model at a time anyway)."""
    return ThreadPoolExecutor(max_workers=max(1, num_models),
                              thread_name_prefix="controller-activate")


@dataclass
class _Activation:
    """An activation under way: a scale-up, or one on the workers a drain freed for it
    (`reserved`, kept for it until the activation ends)."""

    future: Future
    reserved: list = field(default_factory=list)


@dataclass
class _Drain:
    """Workers being freed for a starving model (one, or an aligned group for a split
    model): these instances, each named by its driver and model, drain off them first."""

    workers: list
    instances: list[tuple[Any, str]]
    until: float


class Controller:
    def __init__(self, cluster: LocalCluster, config: WarmServeConfig,
                 min_instances: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 system: SystemSpec | None = None) -> None:
        self.cluster = cluster
        self.system = system or get_system("warmserve")
        self.policy = config.policy
        # the router sends an instance requests past B, up to its engine's bound (overflow):
        # what another model could give up is counted at that bound, or at less where the
        # engine's KV cache fills first (_held, as in the simulator)
        self.engine_bound = max(config.engine.max_num_seqs, config.policy.instance_capacity)
        self.models = [m.name for m in config.models]
        self.weight_bytes = {m.name: model_weight_bytes(m, cluster.cache_dir)
                             for m in config.models}
        self.min_instances = (config.policy.min_instances if min_instances is None
                              else min_instances)
        self._clock = clock
        self._load = {m: ModelLoad() for m in self.models}
        per_day = max(1, round(86400 / self.policy.window_s))  # seasonality: a day
        self.forecasters = {m: ModelForecaster(per_day, self.policy.error_correction_windows,
                                               self.system.forecast_extensions)
                            for m in self.models}
        self._first_tick: float | None = None
        self._drains: dict[str, _Drain] = {}  # starving model -> the workers freed for it
        self._activating: dict[str, _Activation] = {}  # model -> its activation under way
        self._activations = _activation_executor(len(self.models))
        self.actions: deque = deque(maxlen=200)  # (time, action, model, worker) for /v1/cluster
        self.kv = KvReservation(cluster, self.policy.instance_capacity, self.actions)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="controller")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._activations.shutdown(wait=False, cancel_futures=True)

    def seed_history(self, path: Path) -> int:
        """Feed the forecasters earlier windows from a CSV with header
        `model,avg_concurrency,peak_concurrency,rate_rps` (one row per window, oldest first,
        whole days of `window_s` windows). Returns the rows used."""
        return self.seed_rows(load_history(path, set(self.models)))

    def seed_rows(self, rows: dict[str, list[tuple[float, float, float]]]) -> int:
        """seed_history for rows already read (load_history). Returns the rows used."""
        for model, values in rows.items():
            avg, peak, rate = np.asarray(values, dtype=float).reshape(-1, 3).T
            self.forecasters[model].seed({"avg_concurrency": avg, "peak_concurrency": peak,
                                          "rate_rps": rate})
        return sum(len(v) for v in rows.values())

    def record_arrival(self, model: str) -> None:
        if model in self._load:
            self._load[model].arrived += 1

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.policy.control_interval_s
        # Between ticks, workers that lend KV are asked for fresh stats every KV_CHECK_S, so a
        # request blocked on lent blocks gets them back within about that, not within a tick
        # plus the supervisor's poll of the stats.
        wait_s = min(interval, KV_CHECK_S) if self.system.kv_lending else interval
        next_tick = self._clock() + interval
        next_window = self._clock() + self.policy.window_s
        while not self._stop.wait(wait_s):
            now = self._clock()
            try:
                if now < next_tick:
                    self.kv.reclaim_for_lenders(now)
                    continue
                next_tick = now + interval
                self.tick(now)
                if now >= next_window:
                    self.close_window(now)
                    next_window = now + self.policy.window_s
            except Exception:  # a bad tick must not end control
                log.exception("controller tick failed")

    def tick(self, now: float) -> None:
        if self.system.kv_lending:
            self.kv.reclaim_where_needed(now)
        if not self.system.autoscale:  # static placements (muxserve, dedicated)
            return
        if self._first_tick is None:  # instances found at start count as new from here
            self._first_tick = now
        self._record_activations(now)
        self._finish_drains(now)
        for model in self.models:
            load = self._sample(model, now)
            state = self._load[model]
            if self.system.prefill_aware or self.system.overload_control:
                state.work.update(self._engine_stats(model))  # what both rules measure
            if self.system.prefill_aware:
                state.prefill = state.sample_prefill(now, self.policy.load_window_s)
                load = prefill_aware_load(load, state.prefill, self.policy.instance_capacity)
                state.peak_prefill = peak_recent_load(state.recent_prefill, now, state.prefill,
                                                      self.policy.rebalance_reserve_s)
            if self.system.need_from_arrivals:
                rate = state.sample_arrivals(now, self.policy.load_window_s)
                state.peak_rate = peak_recent_load(state.recent_rates, now, rate,
                                                   self.policy.rebalance_reserve_s)
            state.load = load
            state.peak = peak_recent_load(state.recent, now, load, self.policy.rebalance_reserve_s)
            active = [w for w in self.cluster.workers if w.alive and w.state_of(model) == "active"]
            desired = max(self.min_instances, autoscale(
                load, len(active), self.policy.instance_capacity, self.policy.scale_up_ratio,
                self.policy.scale_down_ratio))
            if desired > len(active):
                self._scale_up(model, now)
            elif desired < len(active):
                self._scale_down(model, active, len(active) - desired, now)
        self._record_activations(now)

    def close_window(self, now: float) -> None:
        if not self.system.prewarm:
            return
        window = self.policy.window_s
        for model in self.models:
            state = self._load[model]
            samples = state.window_samples or [(now, self.cluster.inflight(model))]
            values = [c for _, c in samples]
            self.forecasters[model].observe(sum(values) / len(values), max(values),
                                            state.arrivals / window)
            state.close_window()
        requests = self._prewarm_requests()
        if self.system.kv_lending and requests:
            self.kv.lend(now, self._short_of_room(requests))
        self._place_prewarms(now, requests)

    # --- KV-cache reservation (controller/kv.py) -------------------------------------------

    def _short_of_room(self, requests: list[ReplicaRequest]) -> set[str]:
        """The workers where the prewarms placed with their lendable KV counted as room need
        more than their free pool pages: only there is lending worth its reclaim (the
        simulator lends the same way, as placed prewarms need it)."""
        workers, placements = self._placements(requests, self.kv.lendable_bytes())
        needed = dict.fromkeys(workers, 0)
        for placement in placements:
            for gpu in placement.gpus:
                needed[gpu] += self._bytes_per_gpu(placement.model)
        return {w.name for gpu, w in workers.items() if needed[gpu] > _free_bytes(w)}

    # --- actions ------------------------------------------------------------------------------

    def _sample(self, model: str, now: float) -> float:
        state = self._load[model]
        for worker in self.cluster.workers:
            if worker.inflight[model]:
                state.busy_at[worker.name] = now
        return state.sample_concurrency(now, self.cluster.inflight(model),
                                        self.policy.load_window_s)

    def _engine_stats(self, model: str) -> dict[str, dict]:
        """`model`'s engine stats by worker, where it is active and its engine answered."""
        return {w.name: w.stats["models"][model] for w in self.cluster.workers
                if w.alive and w.state_of(model) == "active"
                and "busy_s" in w.stats.get("models", {}).get(model, {})}

    def _scale_up(self, model: str, now: float) -> None:
        """One more instance (the next tick asks again while the load wants more)."""
        if model not in self._activating and model not in self._drains:
            self._activate(model)

    def _activate(self, model: str, reserved: list | None = None) -> None:
        """Activate one more instance of `model` in the background; on `reserved` (the
        workers a drain freed for it, kept for it until this ends) if given."""
        args = (model, reserved[0]) if reserved else (model,)
        self._activating[model] = _Activation(
            self._activations.submit(self.cluster.activate_elsewhere, *args), reserved or [])

    def _record_activations(self, now: float) -> None:
        """Record the activations that finished; a scale-up refused for want of room asks
        rebalancing for a worker."""
        for model, activation in list(self._activating.items()):
            if not activation.future.done():
                continue
            del self._activating[model]
            for worker in activation.reserved:
                self.cluster.unreserve(worker, model)
            try:
                worker = activation.future.result()
            except NoCapacity as exc:
                log.info("cannot scale %s up: %s", model, exc)
                if not activation.reserved and self.system.rebalance:  # a scale-up
                    self._rebalance(model, now)
                continue
            except Exception:  # a failed activation must not end control
                log.exception("activating %s failed", model)
                continue
            self._load[model].activated_at[worker.name] = now
            self.actions.append((now, "activate", model, worker.name))

    def _scale_down(self, model: str, active: list, count: int, now: float) -> None:
        protect = self.policy.new_instance_protect_s
        candidates = sorted(active, key=lambda w: w.inflight[model])
        keep_alive = self.policy.keep_alive_s if self.system.keep_alive else 0.0
        for worker in candidates[:count]:
            started = self._load[model].activated_at.get(worker.name, self._first_tick)
            idle_since = max(started, self._load[model].busy_at.get(worker.name, started))
            if worker.inflight[model] or now - started < protect or now - idle_since < keep_alive:
                continue
            try:  # warmserve keeps the weights prewarmed there; the reactive baseline unloads
                self.cluster.deactivate(worker, model, evict=not self.system.deactivate_to_prewarm)
                self.actions.append((now, "deactivate", model, worker.name))
            except (Refused, WorkerGone) as exc:
                log.info("cannot deactivate %s on %s: %s", model, worker.name, exc)

    # --- rebalancing ------------------------------------------------------------------------

    def _rebalance(self, model: str, now: float) -> None:
        """No worker can take `model` and its load exceeds what its instances hold: drain
        other models' surplus instances off one worker for it, or off one aligned group of
        workers for a split model (policies.drain_for, over the GPUs the workers stand for;
        a split instance drains as a whole), then activate `model` there (_finish_drains)."""
        capacity = self.policy.instance_capacity
        workers = [w for w in self.cluster.workers if w.alive]
        tp = self.cluster.split[model]
        active = sum(1 for w in workers if w.state_of(model) == "active")
        if (model in self._drains or model in self._activating
                or self._load[model].load <= active * capacity):
            return
        entitled = self._entitlement(workers) if self.system.overload_control else None
        if entitled is not None and (active + 1) * tp > entitled[model]:
            return  # the cluster is overloaded and this model's GPUs serve fewer requests
        index = {w.name: i for i, w in enumerate(workers)}
        holdings, where, surplus, pinned = [], {}, {}, []
        for other in self.models:
            if other == model:
                continue
            serving = [w for w in workers if w.state_of(other) == "active"
                       and not self.cluster.is_draining(w, other)]
            seen = self._load[other]
            load, prefill = self._judged_load(other)
            surplus[other] = surplus_instances(
                load, len(serving), self._held(other, workers), self.policy.scale_up_ratio,
                self.forecasters[other].forecast().avg_concurrency, prefill)
            if entitled is not None:  # beyond its entitlement counts as surplus too
                surplus[other] = max(surplus[other],
                                     len(serving) - entitled[other] // self.cluster.split[other])
            for w in serving:  # a split instance: its driver, standing for all its workers
                gpus = tuple(index[m.name] for m in self.cluster.members(w, other)
                             if m.name in index)
                started = seen.activated_at.get(w.name, self._first_tick)
                if now - started < self.policy.new_instance_protect_s:
                    pinned += gpus  # too new to take: its workers stay
                    continue
                where[len(holdings)] = (w, other)
                holdings.append(Holding(len(holdings), other, gpus, w.inflight[other]))
        plan = drain_for(self._groups_for(model, workers, index), holdings, surplus,
                         pinned=pinned)
        if plan is None:
            return
        freed = [workers[g] for g in plan.group]
        drained = [where[h] for h in plan.drain]
        for worker in freed:  # until its activation there ends
            self.cluster.reserve(worker, model)
        for driver, other in drained:
            self.cluster.drain(driver, other)
            if self.system.hand_over_on_drain:  # its requests go on elsewhere, at once
                try:
                    self.cluster.hand_over(driver, other)
                except (Refused, WorkerGone) as exc:
                    log.info("rebalance: handing %s's requests over on %s: %s", other,
                             driver.name, exc)
        self._drains[model] = _Drain(freed, drained, now + self.policy.rebalance_reserve_s)
        self.actions.append((now, "rebalance", model, "+".join(w.name for w in freed)))

    def _groups_for(self, model: str, workers: list, index: dict[str, int]
                    ) -> list[tuple[int, ...]]:
        """Where an instance of `model` may go, as tuples of indices into `workers`: any
        worker not serving it, or for a split model an aligned group of live workers none of
        which holds a part of its instances."""
        tp = self.cluster.split[model]
        if tp == 1:
            return [(i,) for i, w in enumerate(workers) if w.state_of(model) != "active"]
        return [tuple(index[w.name] for w in group) for group in self.cluster.groups(tp)
                if all(w.name in index and w.state_of(model) not in ("active", "following")
                       for w in group)]

    def _held(self, model: str, workers: list) -> int:
        """Requests one of the model's instances holds (policies.requests_held): the engine's
        bound, unless its KV blocks (those lent to prewarms too: they come back when needed)
        fill first with requests holding as many blocks as its running ones do now, on
        average over its engines."""
        instances = total = used = running = 0
        for w in workers:
            entry = w.stats.get("models", {}).get(model, {})
            if entry.get("state") != "active" or "blocks_usable" not in entry:
                continue
            instances += 1
            total += entry["blocks_usable"] + entry["blocks_lent"]
            used += entry["blocks_usable"] - entry["blocks_free"]
            running += entry["running"]
        if not running:
            return self.engine_bound
        return requests_held(self.engine_bound, total // instances, used / running)

    def _judged_load(self, model: str) -> tuple[float, float]:
        return self._load[model].judged(self.system.rebalance_lookback)

    def _entitlement(self, workers: list) -> dict[str, int]:
        """Instances each model may hold when their needs do not fit (policies.gpu_entitlement,
        each instance one unit), from the engines' measured seconds per request. A worker holds
        several models' instances, so the cluster's capacity is counted in instances: those its
        workers hold now, an idle worker counting one. Rebalancing runs only when no worker
        can take another instance, so that is all the cluster holds."""
        capacity = sum(max(1, sum(1 for m in self.models if w.state_of(m) == "active"))
                       for w in workers)
        demands, up = [], self.policy.scale_up_ratio
        for model in self.models:
            state = self._load[model]
            if self.system.need_from_arrivals:
                demands.append(demand_from_arrivals(model, self.cluster.split[model],
                                                    state.peak_rate,
                                                    state.work.gpu_s_per_request, up))
                continue
            load, prefill = self._judged_load(model)
            demands.append(demand_of(
                model, self.cluster.split[model], load,
                self.forecasters[model].forecast().avg_concurrency, prefill,
                self._held(model, workers), up, state.work.gpu_s_per_request))
        return gpu_entitlement(demands, capacity)

    def _finish_drains(self, now: float) -> None:
        """Deactivate drained instances once idle; then activate the model they made room
        for. A drain that has not finished in `rebalance_reserve_s` is called off."""
        for model, drain in list(self._drains.items()):
            for driver, other in list(drain.instances):
                if driver.state_of(other) != "active":  # it ended by itself (a worker died)
                    self.cluster.undrain(driver, other)
                    drain.instances.remove((driver, other))
                    continue
                if driver.inflight[other]:
                    continue
                try:  # a split instance ends as a whole, its driver first
                    self.cluster.deactivate(driver, other,
                                            evict=not self.system.deactivate_to_prewarm)
                except (Refused, WorkerGone) as exc:
                    log.info("rebalance: deactivating %s: %s", other, exc)
                    continue
                drain.instances.remove((driver, other))
                self.actions.append((now, "deactivate", other, driver.name))
            if not drain.instances:
                del self._drains[model]
                if model in self._activating:  # under way already: the workers are not held
                    for worker in drain.workers:
                        self.cluster.unreserve(worker, model)
                else:
                    self._activate(model, reserved=drain.workers)
            elif now >= drain.until:
                for driver, other in drain.instances:
                    self.cluster.undrain(driver, other)
                for worker in drain.workers:
                    self.cluster.unreserve(worker, model)
                del self._drains[model]

    def _prewarm_requests(self) -> list[ReplicaRequest]:
        """Forecast -> the foundation and burst replicas each model wants and has not got
        prewarmed yet."""
        workers = [w for w in self.cluster.workers if w.alive]
        requests: list[ReplicaRequest] = []
        for model in self.models:
            states = [w.state_of(model) for w in workers]
            tp, size = self.cluster.split[model], self._bytes_per_gpu(model)
            plan = replica_plan(model, self.forecasters[model].forecast(), states.count("active"),
                                self.policy.instance_capacity, tp, size, size / H2D_BYTES_PER_S)
            requests += plan[states.count("prewarmed") // tp:]  # a split replica: tp shards
        return requests

    def _bytes_per_gpu(self, model: str) -> int:
        return self.weight_bytes[model] // self.cluster.split[model]

    def _placements(self, requests: list[ReplicaRequest], extra: dict[str, int] | None = None):
        """Evict-aware placement of `requests` over the live workers (a split model's over
        aligned groups of a node's workers) with their free pool bytes as room, plus `extra`
        bytes by worker name; returns the workers by GPU index (cluster.gpu_index) and the
        placements (whose groups are such indices)."""
        workers = {self.cluster.gpu_index(w): w for w in self.cluster.workers if w.alive}
        capacity = [GpuCapacity(gpu, gpu // self.cluster.gpus_per_node,
                                _free_bytes(w) + (extra or {}).get(w.name, 0),
                                frozenset(m for m in self.models if w.state_of(m) is not None))
                    for gpu, w in workers.items()]
        return workers, place_prewarms(requests, capacity, self.cluster.gpus_per_node)

    def _place_prewarms(self, now: float, requests: list[ReplicaRequest]) -> None:
        """Prewarm what the placement of `requests` over the workers' free memory places (a
        split model's shards, each on its worker of the group)."""
        workers, placements = self._placements(requests)
        for placement in placements:
            size = len(placement.gpus)
            for rank, gpu in enumerate(placement.gpus):
                worker = workers[gpu]
                try:
                    worker.client.prewarm(placement.model,
                                          shard=Shard(rank, size) if size > 1 else None)
                    self.actions.append((now, "prewarm", placement.model, worker.name))
                except (Refused, WorkerGone) as exc:
                    log.info("prewarm %s on %s: %s", placement.model, worker.name, exc)


def _free_bytes(worker) -> int:
    return worker.free_pages() * worker.stats.get("pool", {}).get("page_bytes", 0)


def model_weight_bytes(model: ModelConfig, cache_dir: Path) -> int:
    shape = model.checkpoint.removeprefix("synth:")
    arch = (SYNTH_ARCHS[shape] if model.checkpoint.startswith("synth:")
            else read_arch(resolve_checkpoint(model.checkpoint, cache_dir)))
    return arch.num_parameters() * DTYPES[model.dtype].itemsize
