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
