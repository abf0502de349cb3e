"""The workers of this machine, and the router that picks one for a request.

One `LocalWorkerProcess` per device of the config's nodes. The router sends a request to the
least-loaded worker where the model is active; when there is none it activates the model —
where it is prewarmed if it is anywhere, else on the worker with the most free pages (a cold
load). A supervisor thread polls every worker's stats and replaces a worker that died.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from warmserve.cluster.local import LocalWorkerProcess
from warmserve.config import WarmServeConfig
from warmserve.engine.checkpoint import resolve_checkpoint
from warmserve.engine.loader import cuda_device_count
from warmserve.sim.systems import SystemSpec, get_system
from warmserve.worker.rpc import RemoteError, WorkerClient, WorkerGone
from warmserve.worker.worker import Refused

log = logging.getLogger(__name__)


MAX_RESTART_WAIT_S = 60.0  # the longest wait between tries to start a worker that fails


class NoCapacity(RuntimeError):
    """No worker can serve the model right now (all refused or gone)."""


class CannotServe(RuntimeError):
    """The config cannot be served live here (devices this machine lacks, or a setting only
    the simulator runs); the message says what."""


@dataclass(eq=False)
class WorkerHandle:
    node: str
    device_index: int
    process: LocalWorkerProcess | None = None
    stats: dict = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed_starts: int = 0  # in a row: the supervisor waits longer before each next try
    next_start: float = 0.0  # time.monotonic() before which it does not try again

    @property
    def name(self) -> str:
        return f"{self.node}/{self.device_index}"

    @property
    def client(self) -> WorkerClient:
        if self.process is None:
            raise WorkerGone(f"worker {self.name} is not running")
        return self.process.client

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def state_of(self, model: str) -> str | None:
        entry = self.stats.get("models", {}).get(model)
        return entry["state"] if entry else None

    def free_pages(self) -> int:
        return self.stats.get("pool", {}).get("pages_free", 0)


class LocalCluster:
    def __init__(self, config_source: str, config: WarmServeConfig, cache_dir: Path,
                 log_level: str = "warning", poll_interval_s: float = 0.5) -> None:
        self.config_source = config_source
        self.config = config
        self.cache_dir = cache_dir
        self.log_level = log_level
        self.poll_interval_s = poll_interval_s
        self.workers = [WorkerHandle(node.name, i) for node in config.cluster.nodes
                        for i in range(node.num_devices)]
        self._activation_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._lock = threading.Lock()
        self._draining: set[tuple[str, str]] = set()  # (worker, model): no new requests
        self._reserved: dict[str, str] = {}  # worker -> the model a rebalance frees it for
        self._waiting: dict[str, int] = defaultdict(int)  # requests waiting for room, by model
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="cluster-supervisor")
        self.replacements = 0
        self.cold_starts = 0  # activations that had to load weights
        self.prewarm_hits = 0  # activations of weights already in a slot

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.check_servable()
        for model in self.config.models:  # convert or synthesize once, before any worker
            resolve_checkpoint(model.checkpoint, self.cache_dir)
        threads = [threading.Thread(target=self._launch, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.refresh()
        self._supervisor.start()

    def check_servable(self) -> None:
        """Every worker runs on this machine, a node's CUDA devices numbered from 0 here:
        they must exist, and CUDA virtual memory needs NVIDIA's driver bindings. Every
        instance runs on one worker: a tensor-parallel model is the simulator's alone."""
        split = [f"{m.name} (tensor_parallel={m.tensor_parallel})"
                 for m in self.config.models if m.tensor_parallel > 1]
        if split:
            raise CannotServe(f"config {self.config_source!r}: the live system runs each "
                              f"instance on one device; tensor-parallel models are simulated "
                              f"only: {', '.join(split)}")
        wanted = max((sum(g.count for g in node.devices if g.type == "cuda")
                      for node in self.config.cluster.nodes), default=0)
        if not wanted:
            return
        have = cuda_device_count()
        if wanted > have:
            raise CannotServe(f"config {self.config_source!r}: a node of {wanted} CUDA "
                                 f"device(s), and this machine has {have}")
        if importlib.util.find_spec("cuda.bindings") is None:
            raise CannotServe("CUDA devices need NVIDIA's cuda-bindings package (the driver "
                                 "API of the page pool), matching this machine's CUDA")

    def warm_up(self, system: SystemSpec | None = None) -> None:
        """The starting placement of a policy set. warmserve: one active instance per model on
        distinct workers and a prewarmed copy elsewhere; serverlessllm: the active instance
        only; muxserve: every model active on every worker; dedicated: workers divided among
        the models, each worker serving one model."""
        system = system or get_system("warmserve")
        models = [m.name for m in self.config.models]
        if system.dedicated and len(self.workers) < len(models):
            raise NoCapacity(f"dedicated needs a worker per model: {len(self.workers)} workers, "
                             f"{len(models)} models")
        plan: list[tuple[WorkerHandle, str, str]] = []
        for index, worker in enumerate(self.workers):
            if system.colocate:
                plan += [(worker, model, "activate") for model in models]
            elif system.dedicated:
                plan.append((worker, models[index % len(models)], "activate"))
        if not (system.colocate or system.dedicated):
            for index, model in enumerate(models):
                plan.append((self.workers[index % len(self.workers)], model, "activate"))
                spare = self.workers[(index + 1) % len(self.workers)]
                if system.prewarm and spare is not self.workers[index % len(self.workers)]:
                    plan.append((spare, model, "prewarm"))
        for worker, model, verb in plan:
            try:
                getattr(worker.client, verb)(model)
            except (Refused, WorkerGone) as exc:
                log.warning("warm-up: %s %s on %s: %s", verb, model, worker.name, exc)
        self.refresh()

    def close(self) -> None:
        self._stop.set()
        for worker in self.workers:
            if worker.process is not None:
                worker.process.close()

    # --- routing ------------------------------------------------------------------------------

    def route(self, model: str) -> WorkerHandle | None:
        """The least loaded worker serving `model` now, the request counted on it; None where
        no instance serves it. Never blocks on an activation. Choosing the worker and counting
        the request happen under one lock, so a scale-down that checks for idle instances
        under the same lock never takes one a request was just sent to."""
        with self._lock:
            worker = self._least_loaded_locked(model)
            if worker is not None:
                worker.inflight[model] += 1
            return worker

    def acquire(self, model: str) -> WorkerHandle:
        """A worker that serves `model` now, activating it somewhere if needed: this can take
        as long as an activation (and waits for one of `model` under way)."""
        worker = self.route(model)
        if worker is not None:
            return worker
        with self._activation_locks[model]:  # one activation per model at a time
            with self._lock:
                worker = self._least_loaded_locked(model)
            worker = worker or self._activate(model)
            with self._lock:
                worker.inflight[model] += 1
            return worker

    def release(self, worker: WorkerHandle, model: str) -> None:
        with self._lock:
            worker.inflight[model] = max(0, worker.inflight[model] - 1)

    def inflight(self, model: str) -> int:
        """`model`'s requests on its workers and those waiting for a worker to take it."""
        with self._lock:
            return sum(w.inflight[model] for w in self.workers) + self._waiting[model]

    @contextlib.contextmanager
    def waiting(self, model: str) -> Iterator[None]:
        """Count a request as waiting for room for `model` while inside."""
        with self._lock:
            self._waiting[model] += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting[model] -= 1

    def refresh(self) -> None:
        for worker in self.workers:
            try:
                worker.stats = worker.client.stats() if worker.alive else {}
            except WorkerGone:
                worker.stats = {}

    def snapshot(self) -> dict:
        return {"workers": [{"name": w.name, "alive": w.alive, "stats": w.stats,
                             "inflight": dict(w.inflight)} for w in self.workers],
                "replacements": self.replacements, "cold_starts": self.cold_starts,
                "prewarm_hits": self.prewarm_hits}

    def _least_loaded_locked(self, model: str) -> WorkerHandle | None:
        active = [w for w in self.workers if w.alive and w.state_of(model) == "active"
                  and (w.name, model) not in self._draining]
        return min(active, key=lambda w: w.inflight[model], default=None)

    def activate_elsewhere(self, model: str, prefer: WorkerHandle | None = None
                           ) -> WorkerHandle:
        """One more active instance of `model`, on a worker where it is not active yet
        (`prefer` first: a worker the controller freed for it)."""
        with self._activation_locks[model]:
            return self._activate(model, prefer)

    def drain(self, worker: WorkerHandle, model: str) -> None:
        """Route no new requests to `model` on `worker` (it finishes what it runs)."""
        with self._lock:
            self._draining.add((worker.name, model))

    def undrain(self, worker: WorkerHandle, model: str) -> None:
        with self._lock:
            self._draining.discard((worker.name, model))

    def hand_over(self, worker: WorkerHandle, model: str) -> None:
        """Stop `model`'s requests on `worker` to go on elsewhere: the router resumes each on
        another instance (drain it first, so that none comes back)."""
        worker.client.hand_over(model)

    def reserve(self, worker: WorkerHandle, model: str) -> None:
        """Keep `worker` for `model`: no other model is activated there until unreserve (a
        rebalance frees it; another model's prewarmed copy there must not take it back)."""
        with self._lock:
            self._reserved[worker.name] = model

    def unreserve(self, worker: WorkerHandle, model: str) -> None:
        with self._lock:
            if self._reserved.get(worker.name) == model:
                del self._reserved[worker.name]

    def is_draining(self, worker: WorkerHandle, model: str) -> bool:
        with self._lock:
            return (worker.name, model) in self._draining

    def deactivate(self, worker: WorkerHandle, model: str, evict: bool = False) -> None:
        """Stop serving `model` on `worker`; its weights stay there, prewarmed, unless
        `evict` (the reactive baseline unloads what it stops). Refused while it has requests."""
        with self._lock:
            if worker.inflight[model]:
                raise Refused(f"{model} on {worker.name} has requests in flight")
            entry = worker.stats.get("models", {}).get(model)
            if entry:  # the router stops choosing it now
                entry["state"] = "deactivating"
        worker.client.deactivate(model)
        if evict:
            worker.client.evict(model)
        worker.stats = worker.client.stats()
        self.undrain(worker, model)

    def _activate(self, model: str, prefer: WorkerHandle | None = None) -> WorkerHandle:
        with self._lock:
            reserved = dict(self._reserved)
        candidates = [w for w in self.workers if w.alive and w.state_of(model) != "active"
                      and reserved.get(w.name, model) == model]
        prewarmed = [w for w in candidates if w.state_of(model) == "prewarmed"]
        others = sorted((w for w in candidates if w not in prewarmed),
                        key=lambda w: -w.free_pages())
        order = prewarmed + others
        if prefer in order:
            order.remove(prefer)
            order.insert(0, prefer)
        reasons = []
        for worker in order:
            try:
                worker.client.activate(model)
                worker.stats = worker.client.stats()
                with self._lock:
                    if worker in prewarmed:
                        self.prewarm_hits += 1
                    else:
                        self.cold_starts += 1
                return worker
            except (Refused, WorkerGone) as exc:
                reasons.append(f"{worker.name}: {exc}")
        raise NoCapacity(f"no worker can serve {model!r} now ({'; '.join(reasons) or 'none up'})")

    # --- supervision ---------------------------------------------------------------------------

    def _launch(self, worker: WorkerHandle) -> None:
        """Start the worker's process; where it fails, the next try waits 1, 2, 4, ... up to
        MAX_RESTART_WAIT_S seconds, so a worker that cannot start does not spin."""
        try:
            worker.process = LocalWorkerProcess(self.config_source, worker.node,
                                                worker.device_index, self.cache_dir,
                                                self.log_level)
            worker.failed_starts = 0
        except WorkerGone as exc:
            worker.process = None
            wait_s = min(MAX_RESTART_WAIT_S, 2.0 ** worker.failed_starts)
            worker.failed_starts += 1
            worker.next_start = time.monotonic() + wait_s
            log.error("worker %s did not start (%d time(s) in a row): %s; next try in %.0f s",
                      worker.name, worker.failed_starts, exc, wait_s)

    def _supervise(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            for worker in self.workers:
                if self._stop.is_set():
                    return
                if not worker.alive:
                    if time.monotonic() < worker.next_start:
                        continue  # it failed to start a moment ago
                    log.warning("worker %s is gone; starting a new one", worker.name)
                    if worker.process is not None:
                        worker.process.close()
                    worker.stats = {}
                    worker.inflight.clear()
                    self._launch(worker)
                    self.replacements += 1
                    continue
                try:
                    worker.stats = worker.client.stats()
                except WorkerGone:
                    worker.stats = {}
                except RemoteError as exc:  # the worker is up but could not answer: keep going
                    log.warning("stats of worker %s failed: %s", worker.name, exc)
            time.sleep(0)
