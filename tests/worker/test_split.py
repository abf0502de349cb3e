"""A tensor-parallel model across two real worker processes: each holds a shard in its page
pool, the instance's ranks meet when it is activated, the driver serves and lends KV blocks
on behalf of both, and an instance ends cleanly or when its driver is lost."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist
import yaml

from warmserve.cluster.local import LocalWorkerProcess
from warmserve.config import EngineConfig
from warmserve.engine.engine import create_engine
from warmserve.engine.parallel import Shard
from warmserve.engine.sampling import SamplingParams
from warmserve.worker.worker import Group, Refused

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPT = list(range(7, 60))
KV_GIB = 0.004


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "split.yaml"
    path.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "n", "host_memory_gib": 4, "pinned_cache_gib": 1,
                               "devices": [{"type": "cpu", "count": 2, "memory_gib": 0.25}]}]},
        "models": [{"name": "t", "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256, "tensor_parallel": 2},
                   {"name": "w", "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 256}],
        "engine": {"kv_cache_gib": KV_GIB},
        "policy": {"page_size_mib": 2},
    }))
    return path


@pytest.fixture(scope="module")
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def workers(config_path, cache_dir, tiny_checkpoint):
    pair = [LocalWorkerProcess(str(config_path), "n", i, cache_dir) for i in range(2)]
    yield [w.client for w in pair]
    for w in pair:
        w.close()


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    engine = create_engine(tiny_checkpoint, EngineConfig(), "float32", "cpu", 256,
                           kv_cache_bytes=int(KV_GIB * (1 << 30)))
    engine.add_request("x", PROMPT, GREEDY)
    tokens = []
    while engine.has_work():
        tokens += [t for o in engine.step() for t in o.token_ids]
    return tokens


def _activate(clients, store, instance: str) -> None:
    with ThreadPoolExecutor(len(clients)) as pool:
        calls = [pool.submit(c.activate, "t", Group(instance, Shard(r, len(clients)),
                                                    "127.0.0.1", store.port))
                 for r, c in enumerate(clients)]
        for call in calls:
            call.result()


def _tokens(client) -> list[int]:
    return [t for o in client.generate("t", PROMPT, GREEDY) for t in o.token_ids]


def test_a_split_instance_serves_lends_and_ends(workers, store, expected):
    driver, follower = workers
    for rank, client in enumerate(workers):
        assert client.prewarm("t", wait=True, shard=Shard(rank, 2)) == "prewarmed"
        assert client.stats()["models"]["t"]["shard"] == [rank, 2]
    _activate(workers, store, "t-1")
    assert _tokens(driver) == expected
    with pytest.raises(Refused, match="follows instance t-1; its driver, rank 0, serves"):
        _tokens(follower)

    # KV lent by the driver is unmapped on both ranks; reclaimed, mapped on both again
    pages = [c.stats()["models"]["t"]["pages"] for c in workers]
    lent = driver.lend("t", 4)
    assert lent > 0
    time.sleep(0.2)  # the follower unmaps as it receives the message, between steps
    assert [c.stats()["models"]["t"]["pages"] for c in workers] == [p - lent for p in pages]
    assert _tokens(driver) == expected
    assert driver.reclaim("t") == lent
    assert [c.stats()["models"]["t"]["pages"] for c in workers] == pages
    assert _tokens(driver) == expected

    for client in workers:  # the driver first: it ends the followers' loops
        client.deactivate("t")
    assert [c.stats()["models"]["t"]["state"] for c in workers] == ["prewarmed"] * 2
    _activate(workers, store, "t-2")  # a new instance, new groups, the same weights
    assert _tokens(driver) == expected


def test_a_split_model_is_refused_without_its_shard_or_group(workers):
    driver, _ = workers
    with pytest.raises(Refused, match=r"t is split 2 way\(s\) \(tensor_parallel=2\): a worker "
                                      "holds one of 2 shard\\(s\\), not shard 0/1"):
        driver.prewarm("t")
    with pytest.raises(Refused, match="split 2 way"):
        driver.activate("t")
    with pytest.raises(Refused, match=r"w is split 1 way\(s\)"):
        driver.prewarm("w", shard=Shard(0, 2))
    assert driver.prewarm("t", wait=True, shard=Shard(1, 2)) == "prewarmed"
    # another shard replaces the one held, which does not serve
    assert driver.prewarm("t", wait=True, shard=Shard(0, 2)) == "prewarmed"
    assert driver.stats()["models"]["t"]["shard"] == [0, 2]


def test_a_follower_whose_driver_dies_goes_back_to_prewarmed(config_path, cache_dir, store,
                                                               tiny_checkpoint):
    pair = [LocalWorkerProcess(str(config_path), "n", i, cache_dir) for i in range(2)]
    try:
        _activate([w.client for w in pair], store, "t-lost")
        pair[0].kill()
        follower = pair[1].client
        deadline = time.monotonic() + 30
        while follower.stats()["models"]["t"]["state"] == "active":
            assert time.monotonic() < deadline, "the follower still serves a dead instance"
            time.sleep(0.1)
        assert follower.stats()["models"]["t"]["state"] == "prewarmed"
        assert follower.stats()["pool"]["pages_free"] > 0
    finally:
        for w in pair:
            w.close()
