"""The live controller against a fake cluster (the one seam for side effects)."""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from warmserve.config import parse_config
from warmserve.controller import loop
from warmserve.controller.load import EngineWork
from warmserve.controller.loop import Controller

CONFIG = parse_config({
    "cluster": {"nodes": [{"devices": [{"type": "cpu", "count": 3, "memory_gib": 1}]}]},
    "models": [{"name": "m", "checkpoint": "synth:tiny"}],
    "policy": {"instance_capacity": 4, "window_s": 10, "control_interval_s": 0.5,
               "load_window_s": 2, "new_instance_protect_s": 3},
})


class _Inline(Executor):
    """Runs each activation as it is submitted: a tick sees its own activations finished."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


@pytest.fixture(autouse=True)
def _inline_activations(request, monkeypatch):
    if "background_activations" not in request.keywords:
        monkeypatch.setattr(loop, "_activation_executor", lambda n: _Inline())


@dataclass(eq=False)
class FakeWorker:
    name: str
    states: dict = field(default_factory=dict)
    inflight: dict = field(default_factory=lambda: defaultdict(int))
    alive: bool = True
    prewarms: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"pool": {"pages_free": 10,
                                                          "page_bytes": 1 << 30}})

    def state_of(self, model):
        return self.states.get(model)

    def free_pages(self):
        return 10

    @property
    def client(self):
        return self

    def prewarm(self, model, shard=None):
        self.prewarms.append(model)
        self.states[model] = "prewarmed"
        self.stats.setdefault("models", {})[model] = {"state": "prewarmed"}


class _OneNode:
    """What the controller reads of a cluster's layout: every worker on one node, every
    model on one worker."""

    @property
    def split(self):
        return defaultdict(lambda: 1)

    @property
    def gpus_per_node(self):
        return len(self.workers)

    def gpu_index(self, worker):
        return self.workers.index(worker)

    def members(self, worker, model):
        return [worker]

    def groups(self, size):
        from warmserve.control.policies import aligned_groups

        return [[self.workers[g] for g in group]
                for group in aligned_groups(len(self.workers), 1, size)]


class FakeCluster(_OneNode):
    cache_dir = None

    def __init__(self) -> None:
        self.workers = [FakeWorker(f"w{i}") for i in range(3)]
        self.workers[0].states["m"] = "active"
        self.load = 0
        self.log = []

    def inflight(self, model):
        return self.load

    def activate_elsewhere(self, model):
        worker = next(w for w in self.workers if w.states.get(model) != "active")
        worker.states[model] = "active"
        self.log.append(("activate", worker.name))
        return worker

    def deactivate(self, worker, model, evict=False):
        if evict:
            worker.states.pop(model)
        else:
            worker.states[model] = "prewarmed"
        self.log.append(("evict" if evict else "deactivate", worker.name))


def test_scales_up_under_load_and_down_after_protection():
    cluster = FakeCluster()
    ctl = Controller(cluster, CONFIG)
    cluster.load = 7  # > 0.8 x 4
    for t in (0.0, 0.5, 1.0):
        ctl.tick(t)
    assert ("activate", "w1") in cluster.log
    activated_at = 0.0
    cluster.load = 0
    for t in (1.5, 2.0, 2.5, 3.0, 3.5, 4.5, 5.0, 6.0):
        ctl.tick(t)
        if t - activated_at < 3:  # the new instance is protected for new_instance_protect_s
            assert ("deactivate", "w1") not in cluster.log
    active = [w.name for w in cluster.workers if w.states.get("m") == "active"]
    assert len(active) == 1  # scaled back down to min_instances, never to zero


def test_window_prewarms_for_forecast_bursts():
    cluster = FakeCluster()
    ctl = Controller(cluster, CONFIG)
    for t, load in ((0, 2), (1, 9), (2, 12)):  # a burst inside the window
        cluster.load = load
        ctl._sample("m", t)
    cluster.load = 2
    ctl.close_window(10.0)
    # forecast avg 7.7, peak 12 with B = 4 and one active: one foundation and one burst replica
    assert [w.name for w in cluster.workers if w.prewarms] == ["w1", "w2"]
    assert ctl.actions[-1][1] == "prewarm"


def test_reactive_baseline_keeps_alive_then_unloads_and_never_prewarms():
    from warmserve.sim.systems import get_system

    cluster = FakeCluster()
    ctl = Controller(cluster, CONFIG, system=get_system("serverlessllm"))
    cluster.load = 7
    for t in (0.0, 0.5, 1.0):
        ctl.tick(t)
    assert ("activate", "w1") in cluster.log
    cluster.load = 0
    for t in (2.0, 5.0, 30.0):  # idle, but within keep_alive_s (60 s)
        ctl.tick(t)
    assert not any(a == "evict" for a, _ in cluster.log)
    for t in (70.0, 71.0):
        ctl.tick(t)
    assert any(a == "evict" for a, _ in cluster.log)  # unloaded, not kept prewarmed
    ctl._sample("m", 72.0)
    ctl.close_window(80.0)
    assert not any(w.prewarms for w in cluster.workers)


def test_the_published_system_forecasts_as_published():
    from warmserve.sim.systems import get_system

    published = Controller(FakeCluster(), CONFIG, system=get_system("warmserve-published"))
    ours = Controller(FakeCluster(), CONFIG)
    assert not any(f.extensions for f in published.forecasters.values())
    assert all(f.extensions for f in ours.forecasters.values())


def test_static_policies_do_not_scale():
    from warmserve.sim.systems import get_system

    cluster = FakeCluster()
    ctl = Controller(cluster, CONFIG, system=get_system("muxserve"))
    cluster.load = 50
    for t in (0.0, 0.5, 1.0):
        ctl.tick(t)
    assert cluster.log == []


def test_seed_history_from_csv(tmp_path):
    from warmserve.workload.traces import TraceError

    path = tmp_path / "h.csv"
    day = [(5, 8, 1), (20, 30, 4)] * 4320  # a day of 10-s windows
    path.write_text("model,avg_concurrency,peak_concurrency,rate_rps\n"
                    + "".join(f"m,{a},{p},{r}\n" for a, p, r in day))
    ctl = Controller(FakeCluster(), CONFIG)
    assert ctl.seed_history(path) == len(day)
    assert ctl.forecasters["m"].forecast().peak_concurrency == 8  # the same slot yesterday
    # three days that differ in their draw alone: the backtest keeps the same slot's mean
    rng = np.random.default_rng(0)
    days = rng.poisson(np.tile(np.linspace(10, 40, 8640), 3)).astype(float)
    path.write_text("model,avg_concurrency,peak_concurrency,rate_rps\n"
                    + "".join(f"m,{a},{a + 5},1\n" for a in days))
    ctl = Controller(FakeCluster(), CONFIG)
    ctl.seed_history(path)
    assert ctl.forecasters["m"].seasonal_only
    assert ctl.forecasters["m"].forecast().avg_concurrency == pytest.approx(days[::8640].mean())
    path.write_text("model,avg_concurrency,peak_concurrency,rate_rps\nzz,1,1,1\n")
    with pytest.raises(TraceError, match=r"h\.csv:2: model 'zz' is not served"):
        ctl.seed_history(path)
    for bad, message in (("nan", "peak_concurrency 'nan' is not a finite number"),
                         ("-2", "negative value -2.0")):
        path.write_text(f"model,avg_concurrency,peak_concurrency,rate_rps\nm,1,{bad},1\n")
        with pytest.raises(TraceError, match=rf"h\.csv:2: {message}"):
            ctl.seed_history(path)


class KVWorker(FakeWorker):
    """A worker with stats and the lend / reclaim / evict verbs, recording what it is asked."""

    def __init__(self, name, entry, refuse_reclaim=False):
        super().__init__(name)
        self.entry = {"state": "active", "block_bytes": 2 << 20, "blocks_per_unit": 16} | entry
        self.refuse_reclaim = refuse_reclaim
        self.calls = []
        self.stats = {"pool": {"page_bytes": 32 << 20, "pages_free": 10},
                      "models": {"m": self.entry, "other": {"state": "prewarmed"}}}
        self.states = {"m": "active", "other": "prewarmed"}

    def free_pages(self):
        return self.stats["pool"]["pages_free"]

    @property
    def client(self):
        return _KVClient(self)


class _KVClient:
    def __init__(self, worker):
        self.w = worker

    def lend(self, model, pages):
        self.w.calls.append(("lend", model, pages))
        self.w.stats["pool"]["pages_free"] += pages
        return pages

    def reclaim(self, model):
        self.w.calls.append(("reclaim", model))
        if self.w.refuse_reclaim:
            self.w.refuse_reclaim = False
            from warmserve.worker.worker import Refused

            raise Refused("pages in use")
        return 1

    def evict(self, model):
        self.w.calls.append(("evict", model))

    def stats(self):
        return self.w.stats

    def prewarm(self, model, shard=None):
        self.w.prewarms.append(model)


def _kv_controller(worker):
    cluster = FakeCluster()
    cluster.workers = [worker]
    return Controller(cluster, CONFIG)


TWO_KV = parse_config({
    "cluster": {"nodes": [{"devices": [{"type": "cpu", "count": 1, "memory_gib": 1}]}]},
    "models": [{"name": "m", "checkpoint": "synth:tiny"},
               {"name": "other", "checkpoint": "synth:tiny"}],
    "policy": CONFIG.policy.model_dump(),
})


def _lending_controller(worker, other_mib):
    """"m" active on `worker` (free pool: 10 pages of 32 MiB); "other" resident nowhere, its
    forecast wanting one prewarmed replica of `other_mib` (None: no forecast, no replica)."""
    worker.states.pop("other")
    worker.stats["models"].pop("other")
    cluster = FakeCluster()
    cluster.workers = [worker]
    ctl = Controller(cluster, TWO_KV)
    if other_mib is not None:
        ctl.weight_bytes["other"] = other_mib << 20
        cluster.load = 2
        ctl._sample("other", 0.0)
    cluster.load = 0
    ctl._sample("m", 0.0)
    return ctl


@pytest.mark.parametrize(("other_mib", "lent"), [(400, True), (300, False), (None, False)])
def test_idle_kv_is_lent_in_whole_units_at_window_close_where_a_prewarm_needs_it(other_mib,
                                                                               lent):
    """Keep ceil(100 x 1 / 4) = 25 blocks free: 71 blocks = 142 MiB may be lent, 4 whole
    32 MiB pages. A 400-MiB prewarm needs them beside the 320 MiB free; a 300-MiB one fits in
    the free pages, and without a prewarm to place, lending would only be reclaimed again."""
    worker = KVWorker("w0", {"blocks_usable": 100, "blocks_free": 96, "blocks_lent": 0,
                             "running": 1})
    ctl = _lending_controller(worker, other_mib)
    ctl.close_window(10.0)
    assert (("lend", "m", 4) in worker.calls) is lent
    assert worker.prewarms == ([] if other_mib is None else ["other"])


def test_lent_kv_is_reclaimed_when_load_rises_evicting_prewarms_if_needed():
    worker = KVWorker("w0", {"blocks_usable": 40, "blocks_free": 10, "blocks_lent": 60,
                             "running": 3}, refuse_reclaim=True)
    ctl = _kv_controller(worker)
    ctl.tick(0.0)  # keep ceil(100 x 3 / 4) = 75 free, only 10 are: take the 60 back
    assert worker.calls == [("reclaim", "m"), ("evict", "other"), ("reclaim", "m")]
    assert [a[1] for a in ctl.actions] == ["evict", "reclaim"]


def test_requests_waiting_for_lent_blocks_get_them_back_and_block_lending():
    """The live deadlock of 2026-11-28: every block of an engine lent, its requests all
    waiting (none running). The reservation counts waiting requests too: the blocks come back,
    and such an engine lends nothing."""
    worker = KVWorker("w0", {"blocks_usable": 0, "blocks_free": 0, "blocks_lent": 100,
                             "running": 0, "waiting": 18})
    ctl = _kv_controller(worker)
    ctl.tick(0.0)
    assert worker.calls == [("reclaim", "m")]
    worker.entry |= {"blocks_usable": 100, "blocks_free": 100, "blocks_lent": 0, "waiting": 2}
    worker.calls.clear()
    ctl = _lending_controller(worker, 400)
    ctl.close_window(10.0)  # keep ceil(100 x 2 / 4) = 50 free: lend 50 blocks = 3 pages
    assert worker.calls == [("lend", "m", 3)]


def test_a_split_instance_lends_through_its_driver_for_room_on_any_of_its_workers():
    """"m" split over w0 (driver) and w1: lending 71 blocks frees 142 MiB on both, and a
    prewarm short of room on the follower alone has the driver lend."""
    from collections import deque

    from warmserve.controller.kv import KvReservation

    driver = KVWorker("w0", {"blocks_usable": 100, "blocks_free": 96, "blocks_lent": 0,
                             "running": 1})
    follower = KVWorker("w1", {})
    follower.stats["models"]["m"] = {"state": "active", "shard": [1, 2]}  # no engine stats
    bystander = KVWorker("w2", {})
    bystander.stats["models"].pop("m")
    cluster = FakeCluster()
    cluster.workers = [driver, follower, bystander]
    cluster.members = lambda worker, model: [driver, follower] if worker is driver else [worker]
    kv = KvReservation(cluster, capacity=4, actions=deque())
    assert kv.lendable_bytes() == {"w0": 71 * (2 << 20), "w1": 71 * (2 << 20)}
    kv.lend(0.0, {"w2"})
    assert driver.calls == []  # room wanted elsewhere: nothing lent
    kv.lend(0.0, {"w1"})
    assert driver.calls == [("lend", "m", 4)] and follower.calls == []


@pytest.mark.parametrize(("blocked", "reclaimed"), [(1, True), (0, False)])
def test_a_request_blocked_for_lent_blocks_gets_them_back_a_queued_one_does_not(blocked,
                                                                                 reclaimed):
    """Enough free blocks by the reservation (30 of 100 free, 25 kept for 1 request), but the
    engine says its waiting request is blocked (too long for 30): the blocks come back. A request
    that merely waits for the next step (blocked 0) does not trigger a reclaim."""
    worker = KVWorker("w0", {"blocks_usable": 40, "blocks_free": 30, "blocks_lent": 60,
                             "running": 0, "waiting": 1, "blocked": blocked})
    ctl = _kv_controller(worker)
    ctl.tick(0.0)
    assert (worker.calls == [("reclaim", "m")]) is reclaimed


TWO = parse_config({
    "cluster": {"nodes": [{"devices": [{"type": "cpu", "count": 2, "memory_gib": 1}]}]},
    "models": [{"name": "a", "checkpoint": "synth:tiny"},
               {"name": "b", "checkpoint": "synth:tiny"}],
    "policy": {"instance_capacity": 4, "window_s": 10, "control_interval_s": 0.5,
               "load_window_s": 1, "new_instance_protect_s": 3, "rebalance_reserve_s": 5},
})


class FullCluster(_OneNode):
    """Two workers with room for one active model each; both serve "a"."""

    cache_dir = None

    def __init__(self) -> None:
        from warmserve.cluster.manager import NoCapacity

        self.NoCapacity = NoCapacity
        self.workers = [FakeWorker(f"w{i}") for i in range(2)]
        for w in self.workers:
            w.states["a"] = "active"
        self.workers[0].inflight["a"] = 1
        self.load = {"a": 2, "b": 0}
        self.draining: set = set()
        self.reserved: dict = {}
        self.log = []

    def inflight(self, model):
        return self.load[model]

    def activate_elsewhere(self, model, prefer=None):
        free = [w for w in self.workers if "active" not in w.states.values()
                and self.reserved.get(w.name, model) == model]
        free.sort(key=lambda w: w is not prefer)
        if not free:
            raise self.NoCapacity("no room")
        free[0].states[model] = "active"
        self.log.append(("activate", model, free[0].name))
        return free[0]

    def deactivate(self, worker, model, evict=False):
        self._require_active(worker, model)
        worker.states[model] = "prewarmed"
        self.draining.discard((worker.name, model))
        self.log.append(("deactivate", model, worker.name))

    @staticmethod
    def _require_active(worker, model):
        """As a worker: only an instance's driver, serving, can be deactivated."""
        from warmserve.worker.worker import Refused

        if worker.states.get(model) != "active":
            raise Refused(f"{model} is {worker.states.get(model)}, not active")

    def drain(self, worker, model):
        self.draining.add((worker.name, model))
        self.log.append(("drain", model, worker.name))

    def undrain(self, worker, model):
        self.draining.discard((worker.name, model))
        self.log.append(("undrain", model, worker.name))

    def hand_over(self, worker, model):  # the router resumes its requests elsewhere
        assert (worker.name, model) in self.draining
        worker.inflight[model] = 0
        self.log.append(("hand_over", model, worker.name))

    def is_draining(self, worker, model):
        return (worker.name, model) in self.draining

    def reserve(self, worker, model):
        self.reserved[worker.name] = model

    def unreserve(self, worker, model):
        if self.reserved.get(worker.name) == model:
            del self.reserved[worker.name]


def _run(ctl, cluster, start, end):
    t = start
    while t < end:
        ctl.tick(t)
        t += 0.5


def test_rebalancing_drains_a_surplus_instance_and_activates_the_starving_model():
    """Without hand-over, the drained instance finishes its request first (the next test
    has WarmServe's hand-over)."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1  # busy: the autoscaler cannot take it down
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system("warmserve-no-handover"))
    _run(ctl, cluster, 0.0, 4.0)  # past the protection of the instances found at start
    cluster.load["b"] = 6  # b has no instance and no worker has room
    _run(ctl, cluster, 4.0, 5.0)
    # a needs one instance for its load of 2: the one on w1 (fewer requests) drains
    assert ("drain", "a", "w1") in cluster.log and cluster.is_draining(cluster.workers[1], "a")
    assert cluster.workers[1].states["a"] == "active"  # it finishes its request first
    assert cluster.reserved == {"w1": "b"}  # no other model is activated there meanwhile
    cluster.workers[1].inflight["a"] = 0
    _run(ctl, cluster, 5.0, 6.0)
    assert cluster.log.index(("deactivate", "a", "w1")) < cluster.log.index(
        ("activate", "b", "w1"))
    assert cluster.reserved == {}  # b's activation there ended
    assert cluster.workers[0].states["a"] == "active"
    assert cluster.workers[1].states["b"] == "active"
    assert any(action == "rebalance" for _, action, _, _ in ctl.actions)


@pytest.mark.parametrize(("system", "handed"), [("warmserve-no-handover", False),
                                                ("warmserve", True)])
def test_a_drained_instance_hands_its_requests_over(system, handed):
    """As above; WarmServe has the drained instance hand its request over at once, and "b"
    is activated on the next tick instead of after the request finishes."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system(system))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert (("hand_over", "a", "w1") in cluster.log) is handed
    assert (cluster.workers[1].states.get("b") == "active") is handed


def test_a_drain_that_does_not_finish_is_called_off():
    """Without hand-over (or where the hand-over is refused), a drained instance whose
    request does not finish within the reserve time serves its model again."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1  # never finishes in this test
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system("warmserve-no-handover"))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert ("drain", "a", "w1") in cluster.log
    _run(ctl, cluster, 5.0, 11.0)  # rebalance_reserve_s = 5
    assert ("undrain", "a", "w1") in cluster.log
    assert cluster.workers[1].states["a"] == "active"


def test_a_drained_instance_that_ends_by_itself_frees_its_worker_at_once():
    """A drained instance can end without the controller: a worker of a split instance
    died, say, and the rest went back to prewarmed. Its worker is free then: the starving
    model starts there on the next tick rather than after the reserve time."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1  # never finishes: the instance ends instead
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system("warmserve-no-handover"))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert ("drain", "a", "w1") in cluster.log
    cluster.workers[1].states["a"] = "prewarmed"
    cluster.workers[1].inflight["a"] = 0
    _run(ctl, cluster, 5.0, 5.5)
    assert cluster.workers[1].states["b"] == "active"
    assert not cluster.is_draining(cluster.workers[1], "a")  # its next instance takes requests
    assert cluster.reserved == {}


def test_rebalancing_leaves_a_worker_that_a_new_instance_keeps_busy():
    """w1 serves "a" and, since just now, "c": "c" may not be drained yet, so draining "a"
    there would not free w1. "a"'s instance on w0 drains instead, though it runs more."""
    from warmserve.sim.systems import get_system

    three = TWO.model_copy(update={"models": [*TWO.models, TWO.models[0].model_copy(
        update={"name": "c"})]})
    cluster = FullCluster()
    cluster.load["c"] = 0
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1
    ctl = Controller(cluster, three, min_instances=1, system=get_system("warmserve"))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.workers[1].states["c"] = "active"
    ctl._load["c"].activated_at["w1"] = 4.0
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 4.5)
    assert ("drain", "a", "w0") in cluster.log
    assert not any(entry[0] == "drain" and entry[2] == "w1" for entry in cluster.log)


@pytest.mark.parametrize(("lookback", "drains"), [(True, False), (False, True)])
def test_rebalancing_spares_an_instance_its_model_needed_within_the_reserve_time(lookback,
                                                                                drains):
    """"a" carried 40 requests (two instances even at the engine's bound of 32) until 1.5 s
    before "b" starts to starve, and 2 since. On its latest load one of its instances is
    surplus; on its peak of the last rebalance_reserve_s (5 s), none is. (Overload control
    off: on the peak, the two models' needs do not fit the two workers.)"""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1
    system = replace(get_system("warmserve"), rebalance_lookback=lookback,
                     overload_control=False)
    ctl = Controller(cluster, TWO, min_instances=1, system=system)
    cluster.load["a"] = 40
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["a"] = 2
    _run(ctl, cluster, 4.0, 5.5)  # the 1-s load window holds only the 2s from 5.0 on
    cluster.load["b"] = 6
    _run(ctl, cluster, 5.5, 6.5)
    assert any(entry[0] == "drain" for entry in cluster.log) is drains


class SplitCluster(FullCluster):
    """Four workers with room for one instance each; `split` gives the workers each model's
    instance spans (an aligned group, its driver first), `instances` where they serve."""

    def __init__(self, split: dict, instances: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        self.workers = [FakeWorker(f"w{i}") for i in range(4)]
        self.table = defaultdict(lambda: 1, split)
        self.instances: dict = {}
        for model, group in instances:
            self._place(model, [self.workers[i] for i in group])
        self.load = {"a": 0, "b": 0}

    @property
    def split(self):
        return self.table

    def members(self, worker, model):
        return self.instances.get((worker.name, model), [worker])

    def _place(self, model, group):
        group[0].states[model] = "active"
        for follower in group[1:]:
            follower.states[model] = "following"
        self.instances[(group[0].name, model)] = group

    def activate_elsewhere(self, model, prefer=None):
        free = [g for g in self.groups(self.table[model])
                if all(not {"active", "following"} & set(w.states.values())
                       and self.reserved.get(w.name, model) == model for w in g)]
        free.sort(key=lambda g: prefer not in g)
        if not free:
            raise self.NoCapacity("no room")
        self._place(model, free[0])
        self.log.append(("activate", model, "+".join(w.name for w in free[0])))
        return free[0][0]

    def deactivate(self, worker, model, evict=False):
        self._require_active(worker, model)
        for member in self.instances.pop((worker.name, model), [worker]):
            member.states[model] = "prewarmed"
        self.draining.discard((worker.name, model))
        self.log.append(("deactivate", model, worker.name))


FOUR = TWO.model_copy(update={"cluster": parse_config({
    "cluster": {"nodes": [{"devices": [{"type": "cpu", "count": 4, "memory_gib": 1}]}]},
    "models": [{"name": "a", "checkpoint": "synth:tiny"}]}).cluster})


def test_rebalancing_frees_an_aligned_group_for_a_split_model():
    """"a" serves on all four workers and needs one instance; "b", split over two, has none.
    Its instances on the pair running fewer requests (w2+w3) drain, both workers are kept
    for "b", and "b" starts over that pair."""
    from warmserve.sim.systems import get_system

    cluster = SplitCluster({"b": 2}, [("a", (i,)) for i in range(4)])
    for worker, running in zip(cluster.workers, (2, 1, 1, 1), strict=True):
        worker.inflight["a"] = running  # busy: the autoscaler cannot take them down
    cluster.load["a"] = 3
    ctl = Controller(cluster, FOUR, min_instances=1, system=get_system("warmserve"))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 4
    _run(ctl, cluster, 4.0, 5.0)
    drained = {entry[2] for entry in cluster.log if entry[:2] == ("drain", "a")}
    assert drained == {"w2", "w3"}
    assert ("activate", "b", "w2+w3") in cluster.log
    assert [w.states["a"] for w in cluster.workers] == ["active", "active", "prewarmed",
                                                         "prewarmed"]
    assert cluster.reserved == {}  # b's activation there ended


@pytest.mark.parametrize(("new", "drained"), [(None, "w0"), ("w0", "w2")])
def test_rebalancing_drains_a_split_instance_as_a_whole(new, drained):
    """"a", split over two, serves on w0+w1 (1 request) and w2+w3 (2) and needs one instance;
    "b" has none. The instance running fewer requests drains, driver and follower, and "b"
    starts on one of its workers; one that has just started is left alone."""
    from warmserve.sim.systems import get_system

    cluster = SplitCluster({"a": 2}, [("a", (0, 1)), ("a", (2, 3))])
    cluster.workers[0].inflight["a"], cluster.workers[2].inflight["a"] = 1, 2
    cluster.load["a"] = 3
    ctl = Controller(cluster, FOUR, min_instances=1, system=get_system("warmserve"))
    _run(ctl, cluster, 0.0, 4.0)
    if new is not None:
        ctl._load["a"].activated_at[new] = 4.0
    cluster.load["b"] = 4
    _run(ctl, cluster, 4.0, 5.0)
    assert [entry for entry in cluster.log if entry[0] == "drain"] == [("drain", "a", drained)]
    assert ("deactivate", "a", drained) in cluster.log
    assert ("activate", "b", drained) in cluster.log
    kept = {"w0": "w2", "w2": "w0"}[drained]
    assert (kept, "a") in cluster.instances  # serves on


def test_the_reactive_baseline_never_rebalances():
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system("serverlessllm"))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 8.0)
    assert not any(entry[0] == "drain" for entry in cluster.log)


def test_surplus_is_counted_at_the_engines_bound_the_router_fills_to():
    """"a" holds both workers with 3 requests each: at B = 4 it needs both (6 > 0.8 x 4), but
    the router fills an instance up to the engine's 32, so one carries it: "b", with nothing,
    gets the other."""
    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 3
    cluster.workers[1].inflight["a"] = 3
    cluster.load["a"] = 6
    ctl = Controller(cluster, TWO, min_instances=1)
    assert ctl.engine_bound == 32
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert any(entry[0] == "drain" and entry[1] == "a" for entry in cluster.log)


@pytest.mark.parametrize(("free_blocks", "drains"), [(94, True), (0, False)])
def test_an_instance_full_at_its_kv_cache_counts_as_holding_no_more(free_blocks, drains):
    """As above, but the engines report their KV blocks: 100 in service, 3 requests holding 2
    each. With 94 free an instance holds the engine's 32 and one carries "a"; with none free
    it holds the 3 it runs, "a" needs both, and "b" gets nothing. (Overload control off: the
    needs of "a" and "b" do not fit two workers.)"""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    for w in cluster.workers:
        w.inflight["a"] = 3
        w.stats["models"] = {"a": {"state": "active", "running": 3, "blocks_usable": 100,
                                   "blocks_lent": 0, "blocks_free": free_blocks}}
    cluster.load["a"] = 6
    system = replace(get_system("warmserve"), overload_control=False)
    ctl = Controller(cluster, TWO, min_instances=1, system=system)
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert any(entry[0] == "drain" and entry[1] == "a" for entry in cluster.log) is drains


def _engine_entry(prompt_tokens, prefill_tokens, prefill_s, busy_s, finished):
    return {"state": "active", "running": 0, "waiting": 0, "prompt_tokens": prompt_tokens,
            "prefill_tokens": prefill_tokens, "prefill_s": prefill_s, "busy_s": busy_s,
            "finished": finished}


def test_engine_counters_are_summed_over_workers_and_survive_a_new_engine():
    work = EngineWork()
    work.update({"w0": _engine_entry(100, 100, 0.5, 2.0, 4),
                 "w1": _engine_entry(50, 50, 0.25, 1.0, 2)})
    work.update({"w0": _engine_entry(300, 200, 1.0, 3.0, 6),
                 "w1": _engine_entry(50, 50, 0.25, 1.0, 2)})
    assert work.total["prompt_tokens"] == 350 and work.total["finished"] == 8
    assert work.prefill_s_per_token == pytest.approx(1.25 / 250)
    assert work.gpu_s_per_request == pytest.approx(4.0 / 8)
    work.update({"w0": _engine_entry(310, 210, 1.1, 3.1, 7)})  # w1 no longer serves it
    work.update({"w0": _engine_entry(310, 210, 1.1, 3.1, 7),
                 "w1": _engine_entry(20, 20, 0.1, 0.2, 1)})  # a new engine on w1: from 0
    assert work.total["prompt_tokens"] == 380 and work.total["finished"] == 10


def test_prompts_that_outrun_the_prefills_scale_a_model_up():
    """One request in flight, but its engine is given 2,000 prompt tokens a second, each
    taking 1 ms to prefill: two instances' worth of prefill. The prefill-aware signal scales
    "m" up; concurrency alone (its ablation) does not."""
    from warmserve.sim.systems import get_system

    results = {}
    for system in ("warmserve", "warmserve-no-prefill-signal"):
        cluster = FakeCluster()
        cluster.load = 1
        ctl = Controller(cluster, CONFIG, min_instances=1, system=get_system(system))
        worker = cluster.workers[0]
        t = 0.0
        while t < 4.0:
            tokens = int(2000 * t)
            worker.stats["models"] = {"m": _engine_entry(tokens, tokens, tokens * 1e-3,
                                                         tokens * 1e-3, 0)}
            ctl.tick(t)
            t += 0.5
        results[system] = sum(1 for w in cluster.workers if w.states.get("m") == "active")
        if system == "warmserve":
            assert ctl._load["m"].prefill == pytest.approx(2.0)
    assert results == {"warmserve": 3, "warmserve-no-prefill-signal": 1}


@pytest.mark.parametrize(("system", "drains"), [("warmserve", True),
                                                ("warmserve-no-overload-control", False)])
def test_under_overload_every_model_gets_one_worker(system, drains):
    """"a" needs both workers (40 in flight, over 0.8 x 32 at the engine's bound) and "b",
    with nothing, needs one: 3 do not fit 2. Overload control gives each model one before
    any gets more, so one of "a"'s instances drains for "b"; without it "a" keeps both."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.workers[0].inflight["a"] = 2
    cluster.workers[1].inflight["a"] = 1
    cluster.load["a"] = 40
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system(system))
    _run(ctl, cluster, 0.0, 4.0)
    cluster.load["b"] = 6
    _run(ctl, cluster, 4.0, 5.0)
    assert any(entry[0] == "drain" and entry[1] == "a" for entry in cluster.log) is drains


def test_the_live_capacity_counts_every_instance_a_worker_holds():
    """A worker holds several models' instances: two workers holding "a" and "b" on one and
    "a" on the other hold three. "a" needing two and "b" one fit, so each is entitled to its
    need; counted as two GPUs, the cluster would look overloaded."""
    cluster = FullCluster()
    cluster.workers[0].states["b"] = "active"
    cluster.load = {"a": 40, "b": 6}
    ctl = Controller(cluster, TWO, min_instances=1)
    _run(ctl, cluster, 0.0, 2.0)
    assert ctl._entitlement(cluster.workers) == {"a": 2, "b": 1}


def test_overload_control_measures_request_costs_without_the_prefill_signal():
    """Overload control ranks models by their engines' seconds per request: those counters
    are read even when the load signal ignores prefill work."""
    from warmserve.sim.systems import get_system

    cluster = FakeCluster()
    ctl = Controller(cluster, CONFIG, min_instances=1,
                     system=get_system("warmserve-no-prefill-signal"))
    cluster.workers[0].stats["models"] = {"m": _engine_entry(100, 100, 0.1, 2.0, 4)}
    ctl.tick(0.0)
    assert ctl._load["m"].work.gpu_s_per_request == pytest.approx(0.5)
    assert ctl._load["m"].prefill == 0.0  # not folded into the load


def test_the_goodput_variant_judges_needs_from_the_requests_arriving():
    """`warmserve-goodput` samples each model's arrivals and keeps their peak rate over the
    look-back. "a" has 40 in flight but only 2 requests a second arrive, which one instance
    carries at 0.15 engine-seconds each: its need is one worker, not the two its backlog asks."""
    from warmserve.sim.systems import get_system

    cluster = FullCluster()
    cluster.load = {"a": 40, "b": 6}
    cluster.workers[0].states["b"] = "active"
    ctl = Controller(cluster, TWO, min_instances=1, system=get_system("warmserve-goodput"))
    for w in cluster.workers:
        w.stats["models"] = {"a": _engine_entry(1000, 1000, 1.0, 3.0, 20)}  # 0.15 s each
    for k in range(10):  # ticks every 0.5 s
        ctl.record_arrival("a")  # 2 a second
        if k % 2:
            ctl.record_arrival("b")  # 1 a second
        ctl.tick(0.5 * k)
    assert ctl._load["a"].peak_rate == pytest.approx(2.0)
    assert ctl._load["b"].peak_rate == pytest.approx(1.0)
    ctl.close_window(5.0)  # the forecaster's count starts again; the rate does not
    ctl.record_arrival("a")
    ctl.tick(5.0)
    assert ctl._load["a"].arrivals == 1
    # the last second (4.5, 5.5] holds one arrival, counted across the window's reset
    assert ctl._load["a"].sample_arrivals(5.5, 1.0) == pytest.approx(1.0)
    assert ctl._entitlement(cluster.workers) == {"a": 1, "b": 1}
    plain = Controller(cluster, TWO, min_instances=1)  # judged by concurrency
    _run(plain, cluster, 0.0, 2.0)
    assert plain._entitlement(cluster.workers) == {"a": 2, "b": 1}


class SlowCluster(FakeCluster):
    """Activating model m blocks until `release` is set, as a cold load does."""

    def __init__(self) -> None:
        super().__init__()
        self.release, self.started = threading.Event(), threading.Event()

    def activate_elsewhere(self, model):
        self.started.set()
        assert self.release.wait(30)
        return super().activate_elsewhere(model)


@pytest.mark.background_activations
def test_a_slow_activation_holds_up_no_tick():
    """Live on two H200s a 17-s activation stopped the controller: no other model scaled, no
    lent KV came back. Now ticks go on while it loads, start no second activation of that
    model, and record it once it is done."""
    cluster = SlowCluster()
    ctl = Controller(cluster, CONFIG)
    try:
        cluster.load = 40  # 10 per instance of B = 4: a scale-up
        t = 0.0
        for _ in range(3):
            ctl.tick(t)  # returns at once though the activation blocks
            t += 0.5
        assert cluster.started.wait(10)
        assert [a for a in cluster.log if a[0] == "activate"] == []
        assert "m" in ctl._activating and not any(a[1] == "activate" for a in ctl.actions)
        cluster.release.set()
        ctl._activating["m"].future.result(10)
        ctl.tick(t)
        assert cluster.log.count(("activate", "w1")) == 1  # one activation, not one per tick
        assert (t, "activate", "m", "w1") in ctl.actions
        assert ctl._load["m"].activated_at["w1"] == t  # protected from scale-down from now
    finally:
        cluster.release.set()
        ctl.stop()

