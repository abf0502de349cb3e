"""Tensor-parallel instances over real worker processes: the cluster activates them on
aligned groups, routes to their drivers, ends them as a unit, and ends those a dead worker
belonged to."""

from __future__ import annotations

import time

import pytest
import yaml

from warmserve.cluster.manager import LocalCluster, NoCapacity
from warmserve.config import EngineConfig, load_config
from warmserve.engine.engine import create_engine
from warmserve.engine.parallel import Shard
from warmserve.engine.sampling import SamplingParams
from warmserve.sim.systems import get_system

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = list(range(11, 50))
KV_GIB = 0.004


@pytest.fixture
def cluster(tmp_path, cache_dir, tiny_checkpoint):
    """Four CPU workers on one node: "t" split two ways, "w" whole."""
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "n", "host_memory_gib": 4, "pinned_cache_gib": 1,
                               "devices": [{"type": "cpu", "count": 4, "memory_gib": 0.25}]}]},
        "models": [{"name": "t", "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256, "tensor_parallel": 2},
                   {"name": "w", "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256}],
        "engine": {"kv_cache_gib": KV_GIB},
        "policy": {"page_size_mib": 2},
    }))
    cluster = LocalCluster(str(path), load_config(str(path)), cache_dir, poll_interval_s=0.1)
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    engine = create_engine(tiny_checkpoint, EngineConfig(), "float32", "cpu", 256,
                           kv_cache_bytes=int(KV_GIB * (1 << 30)))
    engine.add_request("x", PROMPT, GREEDY)
    tokens = []
    while engine.has_work():
        tokens += [t for o in engine.step() for t in o.token_ids]
    return tokens


def _tokens(worker) -> list[int]:
    return [t for o in worker.client.generate("t", PROMPT, GREEDY) for t in o.token_ids]


def _states(cluster, model):
    return [w.state_of(model) for w in cluster.workers]


def test_split_instances_take_aligned_groups_and_end_as_a_unit(cluster, expected):
    cluster.warm_up(get_system("warmserve"))
    # "t" active on one aligned pair, its shards prewarmed on the other; "w" as ever
    states = _states(cluster, "t")
    assert sorted(states) == ["active", "following", "prewarmed", "prewarmed"]
    first = states.index("active")
    assert first in (0, 2) and states[first + 1] == "following"
    spare = [w for w in cluster.workers if w.state_of("t") == "prewarmed"]
    assert [w.shard_of("t") for w in spare] == [Shard(0, 2), Shard(1, 2)]

    driver = cluster.acquire("t")  # the router picks the driver, never a follower
    assert driver is cluster.workers[first]
    assert _tokens(driver) == expected
    cluster.release(driver, "t")

    second = cluster.activate_elsewhere("t")  # onto the prewarmed pair: a prewarm hit
    assert second is spare[0] and cluster.prewarm_hits >= 1
    assert _tokens(second) == expected
    with pytest.raises(NoCapacity, match="no aligned group of 2 workers can serve 't'"):
        cluster.activate_elsewhere("t")

    cluster.deactivate(driver, "t")  # the driver and its follower, together
    assert _states(cluster, "t")[first:first + 2] == ["prewarmed", "prewarmed"]
    assert cluster.members(second, "t") == [second, cluster.workers[cluster.workers.index(
        second) + 1]]


def test_an_instance_ends_when_one_of_its_workers_dies(cluster):
    driver = cluster.activate_elsewhere("t")
    driver_index = cluster.workers.index(driver)
    follower = cluster.workers[driver_index + 1]
    follower.process.kill()
    deadline = time.monotonic() + 60
    while (driver.state_of("t") == "active" or not follower.alive
           or cluster.members(driver, "t") != [driver]):
        assert time.monotonic() < deadline, "the instance outlived its follower"
        time.sleep(0.2)
    assert driver.client.stats()["models"]["t"]["state"] == "prewarmed"
    assert cluster.activate_elsewhere("t") in cluster.workers  # and a new one can start


def test_the_controller_drains_an_aligned_group_for_a_split_model(tmp_path, cache_dir,
                                                                  expected):
    """Four workers with room for one instance each, all serving "w". Requests for "t",
    split two ways, find no group, so the controller drains "w" off an aligned pair, ends
    those instances and starts "t" over the pair; "t" then answers as the unsplit engine."""
    import contextlib

    from warmserve.controller.loop import Controller

    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "n", "host_memory_gib": 4, "pinned_cache_gib": 1,
                               "devices": [{"type": "cpu", "count": 4, "memory_gib": 0.016}]}]},
        "models": [{"name": name, "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256, "tensor_parallel": tp} for name, tp in (("t", 2),
                                                                              ("w", 1))],
        "engine": {"kv_cache_gib": KV_GIB},
        "policy": {"page_size_mib": 2, "instance_capacity": 2, "new_instance_protect_s": 1,
                   "rebalance_reserve_s": 30},
    }))
    config = load_config(str(path))
    cluster = LocalCluster(str(path), config, cache_dir, poll_interval_s=0.1)
    cluster.start()
    ctl = None
    try:
        for _ in cluster.workers:
            cluster.activate_elsewhere("w")
        with pytest.raises(NoCapacity):  # no pair has room beside "w"
            cluster.activate_elsewhere("t")
        # "w" keeps its four instances but for rebalancing, which may take any of them
        ctl = Controller(cluster, config, min_instances=4)
        with contextlib.ExitStack() as waiting:
            for _ in range(3):  # three requests wait for "t"
                waiting.enter_context(cluster.waiting("t"))
            now, deadline = 0.0, time.monotonic() + 120
            while "active" not in _states(cluster, "t"):
                assert time.monotonic() < deadline, f"no instance of t: {ctl.actions}"
                cluster.refresh()
                ctl.tick(now)
                now += 2.0  # past the protection of the instances found at the start
                time.sleep(0.2)
        rebalances = [a[2:] for a in ctl.actions if a[1] == "rebalance"]
        assert rebalances == [("t", "n/0+n/1")], list(ctl.actions)
        assert _states(cluster, "t")[:2] == ["active", "following"]
        assert _states(cluster, "w")[2:] == ["active", "active"]
        assert _tokens(cluster.workers[0]) == expected
    finally:
        if ctl is not None:
            ctl.stop()
        cluster.close()
