"""A real worker process over the RPC layer: serve, refuse, die."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from warmserve.cluster.local import LocalWorkerProcess
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.worker.rpc import WorkerGone
from warmserve.worker.worker import Refused

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def process(tmp_path_factory, cache_dir, tiny_checkpoint):
    config = tmp_path_factory.mktemp("cfg") / "w.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "n", "host_memory_gib": 4, "pinned_cache_gib": 1,
                               "devices": [{"type": "cpu", "count": 1, "memory_gib": 0.5}]}]},
        "models": [{"name": m, "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256} for m in ("a", "b")],
        "engine": {"kv_cache_gib": 0.01},
        "policy": {"page_size_mib": 2},
    }))
    worker = LocalWorkerProcess(str(config), "n", 0, cache_dir)
    yield worker
    worker.close()


def test_prewarm_activate_generate_over_rpc(process):
    client = process.client
    assert client.call("ping") == "pong"
    assert client.prewarm("a", wait=True) == "prewarmed"
    client.activate("a")
    outputs = list(client.generate("a", list(range(5, 30)), GREEDY))
    assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 10
    stats = client.stats()
    assert stats["models"]["a"]["state"] == "active"
    assert stats["pool"]["pages_total"] > 0


def test_errors_cross_the_wire(process):
    client = process.client
    with pytest.raises(Refused, match="unknown model"):
        client.prewarm("zz")
    client.activate("a")
    with pytest.raises(InvalidRequestError, match="not empty"):
        list(client.generate("a", [], GREEDY))
    assert client.call("ping") == "pong"  # the worker is fine


def test_a_ctrl_c_at_the_terminal_leaves_the_worker_to_its_parent(process):
    """Ctrl-C reaches every process of the terminal's foreground group, workers too: each
    printed a KeyboardInterrupt traceback while `serve` was still shutting down. A worker
    ignores it; the process that started it closes it."""
    os.kill(process.process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert process.alive
    assert process.client.call("ping") == "pong"


def test_killed_worker_fails_calls_fast(tmp_path, cache_dir, process):
    client = process.client
    client.activate("b")
    stream = client.generate("b", list(range(5, 30)),
                             SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    next(stream)
    process.kill()
    with pytest.raises(WorkerGone):
        list(stream)
    with pytest.raises(WorkerGone):
        client.stats()
