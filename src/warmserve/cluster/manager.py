"""The workers of this machine, and the router that picks one for a request.

One `LocalWorkerProcess` per device of the config's nodes. The router sends a request to the
least-loaded worker where the model is active; when there is none it activates the model —
where it is prewarmed if it is anywhere, else on the worker with the most free pages (a cold
load). A supervisor thread polls every worker's stats and replaces a worker that died.

A tensor-parallel model's instance spans an aligned group of a node's workers (devices
[k*tp, (k+1)*tp)), one shard on each; the instance's driver, its rank 0, stands for it:
requests, draining and deactivation go to it, and the cluster deactivates the rest of the
group with it. Its other ranks report the model as `following`. The ranks meet in a
key-value store the cluster holds (`torch.distributed.TCPStore`), under a name fresh for each
activation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from warmserve.cluster.local import LocalWorkerProcess
from warmserve.config import WarmServeConfig
from warmserve.control.policies import aligned_groups
from warmserve.engine.checkpoint import resolve_checkpoint
from warmserve.engine.loader import cuda_device_count
from warmserve.engine.parallel import Shard
from warmserve.sim.systems import SystemSpec, get_system
from warmserve.worker.rpc import RemoteError, WorkerClient, WorkerGone
from warmserve.worker.worker import Group, Refused

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
        """The model's state here: a shard of a split instance other than its driver is
        `following` while the instance serves (the driver counts as the instance)."""
        entry = self.stats.get("models", {}).get(model)
        if not entry:
            return None
        if entry["state"] == "active" and entry.get("shard", [0])[0] != 0:
            return "following"
        return entry["state"]

    def shard_of(self, model: str) -> Shard | None:
        entry = self.stats.get("models", {}).get(model)
        return Shard(*entry["shard"]) if entry and "shard" in entry else None

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
        # a worker's GPU index in the policies' numbering: node-major, equal-sized nodes
        self.gpus_per_node = max(node.num_devices for node in config.cluster.nodes)
        self._node_index = {node.name: i for i, node in enumerate(config.cluster.nodes)}
        self.split = {m.name: m.tensor_parallel for m in config.models}
        self._store: dist.TCPStore | None = None  # where split instances' ranks meet
        self._instances: dict[tuple[str, str], list[WorkerHandle]] = {}  # (driver, model)
        self._instance_count = 0
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
        if any(size > 1 for size in self.split.values()):
            self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        threads = [threading.Thread(target=self._launch, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.refresh()
        self._supervisor.start()

    def check_servable(self) -> None:
        """Every worker runs on this machine, a node's CUDA devices numbered from 0 here:
        they must exist, and CUDA virtual memory needs NVIDIA's driver bindings."""
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
        models = [m.name for m in self.config.models if self.split[m.name] == 1]
        for model in (m for m, size in self.split.items() if size > 1):  # first: they need
            self._warm_up_split(model, system)  # whole aligned groups
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

    def _warm_up_split(self, model: str, system: SystemSpec) -> None:
        """A tensor-parallel model's starting placement: one instance on an aligned group
        (on every group where models are co-located), and for warmserve its shards
        prewarmed on another group."""
        instances = len(self.groups(self.split[model])) if system.colocate else 1
        try:
            for _ in range(instances):
                self._activate(model)
        except NoCapacity as exc:
            log.warning("warm-up: activating %s: %s", model, exc)
        if not system.prewarm or system.colocate:
            return
        spare = next((g for g in self.groups(self.split[model])
                      if all(w.state_of(model) is None for w in g)), None)
        for rank, worker in enumerate(spare or []):
            try:
                worker.client.prewarm(model, shard=Shard(rank, len(spare)))
            except (Refused, WorkerGone) as exc:
                log.warning("warm-up: prewarming %s on %s: %s", model, worker.name, exc)

    def close(self) -> None:
        self._stop.set()
        # All at once, then each waited for: ended one by one, the shards of a split
        # instance would each see their driver go first and report it lost
        processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            process.terminate()
        for process in processes:
            process.close()

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

    def gpu_index(self, worker: WorkerHandle) -> int:
        """The worker's GPU in the policies' numbering (node-major, `gpus_per_node` each)."""
        return self._node_index[worker.node] * self.gpus_per_node + worker.device_index

    def groups(self, size: int) -> list[list[WorkerHandle]]:
        """The aligned groups of `size` workers a split instance may span, within a node."""
        at = {self.gpu_index(w): w for w in self.workers}
        return [[at[g] for g in group]
                for group in aligned_groups(self.gpus_per_node, len(self._node_index), size)
                if all(g in at for g in group)]

    def members(self, worker: WorkerHandle, model: str) -> list[WorkerHandle]:
        """The workers of the instance of `model` that `worker` drives, the driver first."""
        with self._lock:
            return list(self._instances.get((worker.name, model), [worker]))

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
        with self._lock:
            followers = self._instances.pop((worker.name, model), [worker])[1:]
        for follower in followers:  # after the driver: it ends their step loops
            self._leave(follower, model, evict)

    def _leave(self, follower: WorkerHandle, model: str, evict: bool) -> None:
        """Deactivate a follower shard whose driver stopped (it may have gone back to
        prewarmed by itself already, or died)."""
        try:
            with contextlib.suppress(Refused):
                follower.client.deactivate(model)
            if evict:
                follower.client.evict(model)
            follower.stats = follower.client.stats()
        except (Refused, WorkerGone) as exc:
            log.info("deactivating %s's shard on %s: %s", model, follower.name, exc)

    def _activate(self, model: str, prefer: WorkerHandle | None = None) -> WorkerHandle:
        if self.split.get(model, 1) > 1:
            return self._activate_split(model, prefer)
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

    def _activate_split(self, model: str, prefer: WorkerHandle | None) -> WorkerHandle:
        """An instance of a tensor-parallel model on an aligned group where no worker
        serves it and none is kept for another model: a group holding its shards prewarmed
        first (the one with `prefer` before all), then the group with the most free pages.
        Returns the driver."""
        size = self.split[model]
        with self._lock:
            reserved = dict(self._reserved)
        candidates = [g for g in self.groups(size)
                      if all(w.alive and w.state_of(model) not in ("active", "following")
                             and reserved.get(w.name, model) == model for w in g)]

        def prewarmed(group: list[WorkerHandle]) -> bool:
            return all(w.state_of(model) == "prewarmed" and w.shard_of(model) == Shard(r, size)
                       for r, w in enumerate(group))

        order = sorted(candidates, key=lambda g: (prefer not in g, not prewarmed(g),
                                                  -sum(w.free_pages() for w in g)))
        reasons = []
        for group in order:
            hit = prewarmed(group)
            try:
                self._start_instance(model, group)
            except (Refused, WorkerGone, RemoteError) as exc:
                reasons.append(f"{'+'.join(w.name for w in group)}: {exc}")
                continue
            with self._lock:
                if hit:
                    self.prewarm_hits += 1
                else:
                    self.cold_starts += 1
            return group[0]
        raise NoCapacity(f"no aligned group of {size} workers can serve {model!r} now "
                         f"({'; '.join(reasons) or 'none free'})")

    def _start_instance(self, model: str, group: list[WorkerHandle]) -> None:
        """Activate `model` split over `group`: first each worker makes room and puts its
        shard in place, so that a worker that cannot refuses before any waits for it; then
        all join the instance at once. Where any fails, those that started stop again."""
        size = len(group)
        with ThreadPoolExecutor(size) as pool:
            self._all(group, [pool.submit(w.client.prewarm, model, True, Shard(r, size), True)
                              for r, w in enumerate(group)])
            with self._lock:
                self._instance_count += 1
                instance = f"{model}#{self._instance_count}"
            calls = [pool.submit(w.client.activate, model,
                                 Group(instance, Shard(r, size), "127.0.0.1", self._store.port))
                     for r, w in enumerate(group)]
            try:
                self._all(group, calls)
            except (Refused, WorkerGone, RemoteError):
                for worker in group:
                    self._leave(worker, model, evict=False)
                raise
        for worker in group:
            worker.stats = worker.client.stats()
        with self._lock:
            self._instances[(group[0].name, model)] = list(group)

    @staticmethod
    def _all(group: list[WorkerHandle], calls: list[Future]) -> None:
        """Wait for every call; raise the first worker's error, naming the worker."""
        errors = []
        for worker, call in zip(group, calls, strict=True):
            try:
                call.result()
            except (Refused, WorkerGone, RemoteError) as exc:
                errors.append((worker, exc))
        if errors:
            worker, exc = errors[0]
            raise type(exc)(f"{worker.name}: {exc}")

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

    def _end_instances_with(self, dead: WorkerHandle) -> None:
        """A worker died: every split instance it was part of ends. Its driver (unless it is
        the one that died) stops, failing what it ran; its followers go back to prewarmed."""
        with self._lock:
            ended = [(key, group) for key, group in self._instances.items() if dead in group]
            for key, _ in ended:
                del self._instances[key]
        for (_, model), group in ended:
            log.warning("%s's instance on %s lost worker %s", model,
                        "+".join(w.name for w in group), dead.name)
            for worker in group:
                if worker is not dead:
                    self._leave(worker, model, evict=False)

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
                    self._end_instances_with(worker)
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
