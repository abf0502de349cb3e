"""The live controller: the simulator's policies applied to real workers.

Every `control_interval_s` it samples each model's concurrency (requests in flight at the
router), runs the published autoscaler on the time-weighted mean over `load_window_s`, and
activates or deactivates instances. Every `window_s` it feeds the forecaster the window that
closed, plans foundation and burst replicas for the next one, and prewarms the ones that have
no active instance behind them on workers where the model is not resident yet.
The decisions are the pure functions of `warmserve.control`; this loop only gathers the
snapshot and applies the actions through the cluster's worker clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from warmserve.cluster.manager import LocalCluster, NoCapacity
from warmserve.config import WarmServeConfig
from warmserve.control.policies import autoscale, replica_plan
from warmserve.control.predictor import ModelForecaster
from warmserve.sim.systems import SystemSpec, get_system
from warmserve.worker.rpc import WorkerGone
from warmserve.worker.worker import Refused

log = logging.getLogger(__name__)


@dataclass
class _ModelLoad:
    samples: deque = field(default_factory=deque)  # (time, concurrency)
    window_samples: list = field(default_factory=list)
    arrivals: int = 0
    activated_at: dict[str, float] = field(default_factory=dict)  # worker name -> time
    busy_at: dict[str, float] = field(default_factory=dict)  # worker name -> last time busy


class Controller:
    def __init__(self, cluster: LocalCluster, config: WarmServeConfig,
                 min_instances: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 system: SystemSpec | None = None) -> None:
        self.cluster = cluster
        self.system = system or get_system("warmserve")
        self.policy = config.policy
        self.models = [m.name for m in config.models]
        self.min_instances = (config.policy.min_instances if min_instances is None
                              else min_instances)
        self._clock = clock
        self._load = {m: _ModelLoad() for m in self.models}
        per_day = max(1, round(86400 / self.policy.window_s))  # seasonality: a day
        self.forecasters = {m: ModelForecaster(per_day, self.policy.error_correction_windows)
                            for m in self.models}
        self._first_tick: float | None = None
        self.actions: deque = deque(maxlen=200)  # (time, action, model, worker) for /v1/cluster
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="controller")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def seed_history(self, path: Path) -> int:
        """Feed the forecasters earlier windows from a CSV with header
        `model,avg_concurrency,peak_concurrency,rate_rps` (one row per window, oldest first,
        whole days of `window_s` windows). Returns the rows used."""
        rows = load_history(path, set(self.models))
        for model, values in rows.items():
            forecaster = self.forecasters[model]
            for avg, peak, rate in values:
                forecaster.observe(avg, peak, rate)
            for series in forecaster.series.values():
                series.errors.clear()
                series.seasonal_abs_errors.clear()
                series.last_abs_errors.clear()
        return sum(len(v) for v in rows.values())

    def record_arrival(self, model: str) -> None:
        if model in self._load:
            self._load[model].arrivals += 1

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        next_window = self._clock() + self.policy.window_s
        while not self._stop.wait(self.policy.control_interval_s):
            now = self._clock()
            try:
                self.tick(now)
                if now >= next_window:
                    self.close_window(now)
                    next_window = now + self.policy.window_s
            except Exception:  # a bad tick must not end control
                log.exception("controller tick failed")

    def tick(self, now: float) -> None:
        if not self.system.autoscale:  # static placements (muxserve, dedicated)
            return
        if self._first_tick is None:  # instances found at start count as new from here
            self._first_tick = now
        for model in self.models:
            load = self._sample(model, now)
            active = [w for w in self.cluster.workers if w.alive and w.state_of(model) == "active"]
            desired = max(self.min_instances, autoscale(
                load, len(active), self.policy.instance_capacity, self.policy.scale_up_ratio,
                self.policy.scale_down_ratio))
            if desired > len(active):
                self._scale_up(model, desired - len(active), now)
            elif desired < len(active):
                self._scale_down(model, active, len(active) - desired, now)

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
            state.window_samples, state.arrivals = [], 0
            forecast = self.forecasters[model].forecast()
            active = sum(1 for w in self.cluster.workers if w.state_of(model) == "active")
            plan = replica_plan(model, forecast, active, self.policy.instance_capacity, 1, 0, 1.0)
            resident = sum(1 for w in self.cluster.workers if w.state_of(model) is not None)
            for _ in range(max(0, active + len(plan) - resident)):
                if not self._prewarm(model, now):
                    break

    # --- actions ------------------------------------------------------------------------------

    def _sample(self, model: str, now: float) -> float:
        state = self._load[model]
        concurrency = self.cluster.inflight(model)
        state.samples.append((now, concurrency))
        for worker in self.cluster.workers:
            if worker.inflight[model]:
                state.busy_at[worker.name] = now
        state.window_samples.append((now, concurrency))
        while state.samples and state.samples[0][0] < now - self.policy.load_window_s:
            state.samples.popleft()
        return sum(c for _, c in state.samples) / len(state.samples)

    def _scale_up(self, model: str, count: int, now: float) -> None:
        for _ in range(count):
            try:
                worker = self.cluster.activate_elsewhere(model)
            except NoCapacity as exc:
                log.info("cannot scale %s up: %s", model, exc)
                return
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

    def _prewarm(self, model: str, now: float) -> bool:
        candidates = sorted((w for w in self.cluster.workers
                             if w.alive and w.state_of(model) is None),
                            key=lambda w: -w.free_pages())
        for worker in candidates:
            try:
                worker.client.prewarm(model)
                self.actions.append((now, "prewarm", model, worker.name))
                return True
            except (Refused, WorkerGone):
                continue
        return False


def load_history(path: Path, models: set[str]) -> dict[str, list[tuple[float, float, float]]]:
    """Rows of a history CSV by model; errors name the file and line."""
    from warmserve.workload.traces import TraceError, _rows

    out: dict[str, list[tuple[float, float, float]]] = {}
    for line, row in _rows(path, ("model", "avg_concurrency", "peak_concurrency", "rate_rps")):
        if row["model"] not in models:
            raise TraceError(f"{path}:{line}: model {row['model']!r} is not served "
                             f"({', '.join(sorted(models))})")
        try:
            values = tuple(float(row[k]) for k in ("avg_concurrency", "peak_concurrency",
                                                   "rate_rps"))
        except ValueError as exc:
            raise TraceError(f"{path}:{line}: {exc}") from None
        if min(values) < 0:
            raise TraceError(f"{path}:{line}: negative value {min(values)}")
        out.setdefault(row["model"], []).append(values)
    return out
