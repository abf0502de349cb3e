"""The router's choices over worker handles (no processes: their state is set by hand)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from warmserve.cluster.manager import LocalCluster, NoCapacity
from warmserve.config import load_config


class _Client:
    def __init__(self, handle) -> None:
        self.handle = handle

    def activate(self, model):
        self.handle.stats["models"][model] = {"state": "active"}

    def stats(self):
        return self.handle.stats


def _cluster() -> LocalCluster:
    config = load_config("cpu-local")
    cluster = LocalCluster("cpu-local", config, Path("unused"))
    for handle in cluster.workers:
        handle.process = SimpleNamespace(alive=True, client=_Client(handle))
        handle.stats = {"models": {}, "pool": {"pages_free": 10}}
    return cluster


def test_a_draining_instance_gets_no_new_requests():
    cluster = _cluster()
    w0, w1 = cluster.workers
    for w in (w0, w1):
        w.stats["models"]["m"] = {"state": "active"}
    w1.inflight["m"] = 3
    assert cluster.acquire("m") is w0  # least loaded
    cluster.drain(w0, "m")
    assert cluster.is_draining(w0, "m")
    assert cluster.acquire("m") is w1  # w0 drains: everything goes to w1
    cluster.undrain(w0, "m")
    assert cluster.acquire("m") is w0


def test_activation_tries_the_preferred_worker_first():
    cluster = _cluster()
    w0, w1 = cluster.workers
    w0.stats["pool"]["pages_free"] = 99  # the most free pages: the usual first choice
    assert cluster.activate_elsewhere("m", prefer=w1) is w1
    assert cluster.activate_elsewhere("m") is w0


def test_a_worker_reserved_for_a_model_takes_no_other():
    """Live, a drain freed a worker for b, and a's prewarmed copy there was activated before
    b's activation ran: the worker went back to a. Reserved for b, it is b's."""
    cluster = _cluster()
    w0, w1 = cluster.workers
    w0.stats["models"]["a"] = {"state": "active"}
    w1.stats["models"]["a"] = {"state": "prewarmed"}  # a's instance there just drained
    cluster.reserve(w1, "b")
    with pytest.raises(NoCapacity):  # w0 serves a already, w1 is b's
        cluster.activate_elsewhere("a")
    assert cluster.activate_elsewhere("b", prefer=w1) is w1
    cluster.unreserve(w1, "b")
    w1.stats["models"]["b"] = {"state": "prewarmed"}
    assert cluster.activate_elsewhere("a") is w1  # the reservation is gone


def test_the_supervisor_survives_a_worker_that_cannot_answer():
    """A worker whose stats call fails inside it (a stuck engine, say) is polled again; the
    supervisor thread does not die (it used to, leaving every worker's stats stale)."""
    import time

    from warmserve.worker.rpc import RemoteError

    cluster = _cluster()
    cluster.poll_interval_s = 0.02
    w0, _ = cluster.workers
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise RemoteError("stats: engine not responding")
        return {"models": {"m": {"state": "active"}}, "pool": {"pages_free": 1}}

    w0.process.client.stats = flaky
    cluster._supervisor.start()
    try:
        deadline = time.monotonic() + 5
        while w0.state_of("m") != "active" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cluster._supervisor.is_alive() and w0.state_of("m") == "active"
    finally:
        cluster._stop.set()
        cluster._supervisor.join(2)


def test_a_worker_that_cannot_start_is_tried_again_later_and_later(monkeypatch):
    """1, 2, 4, ... seconds up to a minute between tries, and the supervisor does not try
    before then: a worker that cannot start used to be restarted at every poll."""
    import time

    import warmserve.cluster.manager as manager
    from warmserve.worker.rpc import WorkerGone

    starts = []

    def cannot_start(*args, **kwargs):
        starts.append(time.monotonic())
        raise WorkerGone("worker for device did not start (exit code 1)")

    monkeypatch.setattr(manager, "LocalWorkerProcess", cannot_start)
    cluster = _cluster()
    w0, w1 = cluster.workers
    waits = []
    for _ in range(9):
        cluster._launch(w0)
        waits.append(round(w0.next_start - starts[-1]))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60] and w0.failed_starts == 9
    w0.process = None  # gone, and its next try a minute away
    cluster.poll_interval_s = 0.02
    before = len(starts)
    cluster._supervisor.start()
    try:
        time.sleep(0.3)  # some 15 polls
    finally:
        cluster._stop.set()
        cluster._supervisor.join(2)
    assert len(starts) == before and w1.alive
