"""The universal worker on the host backend: prewarm, activate (warm and cold), lend and
reclaim, deactivate, evict (also mid-prewarm), refusals."""

from __future__ import annotations

import time

import pytest

from warmserve.config import EngineConfig, ModelConfig
from warmserve.engine.engine import create_engine
from warmserve.engine.parallel import Shard
from warmserve.engine.sampling import SamplingParams
from warmserve.memory.backends import HostBackend
from warmserve.memory.pool import PagePool
from warmserve.worker.worker import ModelState, Refused, UniversalWorker

PAGE = 64 << 10
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = list(range(7, 40))
ENGINE = EngineConfig(block_size_tokens=16)


def _models():
    return [ModelConfig(name=n, checkpoint="synth:tiny", dtype="float32", max_context=256)
            for n in ("a", "b", "c")]


@pytest.fixture
def worker(cache_dir, tiny_checkpoint):
    pool = PagePool(HostBackend(PAGE), 96)
    worker = UniversalWorker(pool, _models(), ENGINE, cache_dir, host_cache_bytes=64 << 20,
                             kv_bytes=16 * PAGE, first_kv_bytes=4 * PAGE)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    engine = create_engine(tiny_checkpoint, ENGINE, "float32", "cpu", 256,
                           kv_cache_bytes=16 * PAGE)
    engine.add_request("x", PROMPT, GREEDY)
    tokens = []
    while engine.has_work():
        tokens += [t for o in engine.step() for t in o.token_ids]
    return tokens


def _tokens(worker, name):
    return worker.generate(name, PROMPT, GREEDY).collect().token_ids


def test_prewarm_then_activate_serves_correctly(worker, expected):
    assert worker.prewarm("a", wait=True) is ModelState.PREWARMED
    stats = worker.stats()["models"]["a"]
    assert stats["state"] == "prewarmed"
    assert stats["prewarm_bytes_done"] == stats["weight_bytes"]
    worker.activate("a")
    assert _tokens(worker, "a") == expected
    worker.pool.check()


def test_the_runner_is_built_while_prewarmed_and_used_by_the_activation(worker, expected):
    free = worker.pool.num_free_pages
    worker.prewarm("a", wait=True)
    worker.pool.flush()
    assert worker.stats()["models"]["a"]["runner_ready"]
    runner = worker._residents["a"].runner
    weight_pages = worker._residents["a"].layout.weight_pages
    assert worker.pool.num_free_pages == free - weight_pages  # the scratch page went back
    worker.activate("a")
    assert worker._residents["a"].runner is runner  # no second build (no graph capture)
    assert _tokens(worker, "a") == expected
    worker.pool.check()


def test_without_a_free_page_the_activation_builds_the_runner(worker, monkeypatch, expected):
    import warmserve.worker.worker as module

    real_map = module.PagePool.map

    def full(pool, slot, pages):  # the pool has room for the weights only
        if any(p >= worker._residents["a"].layout.weight_pages for p in pages):
            raise module.PoolFullError("no free pages (simulated)")
        return real_map(pool, slot, pages)

    monkeypatch.setattr(module.PagePool, "map", full)
    worker.prewarm("a", wait=True)
    monkeypatch.undo()
    assert not worker.stats()["models"]["a"]["runner_ready"]
    worker.activate("a")
    assert worker._residents["a"].runner is not None
    assert _tokens(worker, "a") == expected


def test_a_prewarm_that_runs_out_of_pages_gives_them_back(worker, monkeypatch, expected):
    """Serving models' KV cache can take the free pages while a prewarm streams weights: the
    prewarm is abandoned, its pages go back at once, and the model can be prewarmed again."""
    import warmserve.worker.worker as module

    real_map = module.PagePool.map

    def full(pool, slot, pages):  # the pool runs dry half-way through the weights
        if any(p >= 2 for p in pages):
            raise module.PoolFullError("need 8 pages, 2 are free (simulated)")
        return real_map(pool, slot, pages)

    free = worker.pool.num_free_pages
    monkeypatch.setattr(module.PagePool, "map", full)
    worker.prewarm("a")  # nobody waits for it: the prewarm itself gives the pages back
    deadline = time.monotonic() + 30
    while "a" in worker.stats()["models"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "a" not in worker.stats()["models"]
    worker.pool.flush()
    assert worker.pool.num_free_pages == free and not worker.pool.slots
    with pytest.raises(Refused, match="a: prewarm abandoned: need 8 pages"):
        worker.activate("a")  # a waiting activation is refused with the reason
    monkeypatch.undo()
    worker.activate("a")
    assert _tokens(worker, "a") == expected
    worker.pool.check()


def test_cold_activation_and_deactivate_keeps_weights(worker, expected):
    worker.activate("b")  # never prewarmed: loaded cold
    assert _tokens(worker, "b") == expected
    free_before = worker.pool.num_free_pages
    runner = worker._residents["b"].runner
    worker.deactivate("b")
    assert worker.stats()["models"]["b"]["state"] == "prewarmed"
    assert worker.pool.num_free_pages > free_before  # the KV pages went back
    worker.activate("b")
    assert worker._residents["b"].runner is runner  # reused: same addresses, graphs valid
    assert _tokens(worker, "b") == expected


def test_lend_pages_to_a_prewarm_then_reclaim(worker, expected):
    worker.activate("a")
    worker.pool.flush()
    free = worker.pool.num_free_pages
    lent = worker.lend("a", 8)
    assert lent == 8 and worker.pool.num_free_pages == free + 8
    worker.prewarm("c", wait=True)  # uses pool pages, possibly the lent ones
    assert _tokens(worker, "a") == expected  # serving continues on the smaller cache
    worker.evict("c")
    worker.pool.flush()
    assert worker.reclaim("a") == 8
    assert _tokens(worker, "a") == expected
    worker.pool.flush()
    worker.pool.check()


def test_lend_takes_what_is_free_when_asked_for_more(worker, expected):
    worker.activate("a")
    worker.pool.flush()
    free = worker.pool.num_free_pages
    lent = worker.lend("a", 10**6)  # far more than the cache has
    assert 0 < lent < 10**6 and worker.pool.num_free_pages == free + lent
    assert worker.lend("a", 8) == 0  # nothing left to lend: no error
    worker.pool.flush()
    assert worker.reclaim("a") == lent
    assert _tokens(worker, "a") == expected


def test_failed_activation_leaves_the_model_prewarmed(worker, monkeypatch, expected):
    import warmserve.worker.worker as module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    worker.prewarm("a", wait=True)
    free = worker.pool.num_free_pages
    monkeypatch.setattr(module, "create_engine", out_of_memory)
    with pytest.raises(Refused, match="activation failed: CUDA out of memory"):
        worker.activate("a")
    worker.pool.flush()
    assert worker.stats()["models"]["a"]["state"] == "prewarmed"
    assert worker.pool.num_free_pages == free  # the KV pages went back
    monkeypatch.undo()
    worker.activate("a")
    assert _tokens(worker, "a") == expected


def test_evict_during_prewarm_is_safe(worker):
    worker.prewarm("c")  # not waiting
    worker.evict("c")
    worker.pool.flush()
    assert "c" not in worker.stats()["models"]
    assert worker.pool.num_free_pages == worker.pool.num_pages
    worker.pool.check()


def test_refusals(worker, cache_dir):
    with pytest.raises(Refused, match="unknown model 'zz'"):
        worker.prewarm("zz")
    with pytest.raises(Refused, match="not resident"):
        worker.generate("a", PROMPT, GREEDY)
    worker.prewarm("a", wait=True)
    with pytest.raises(Refused, match="prewarmed, not active"):
        worker.generate("a", PROMPT, GREEDY)
    small = UniversalWorker(PagePool(HostBackend(PAGE), 3), _models(), ENGINE, cache_dir,
                            host_cache_bytes=64 << 20, kv_bytes=16 * PAGE,
                            first_kv_bytes=4 * PAGE)
    try:
        with pytest.raises(Refused, match="pages for weights and a first KV chunk"):
            small.prewarm("a")
        assert small.pool.num_free_pages == 3  # the refusal changed nothing
    finally:
        small.close()


def test_a_stuck_engine_is_reported_and_does_not_stall_the_worker(worker, monkeypatch, capfd,
                                                                  caplog):
    """An engine loop that does not get back between steps (a step hung): stats answers for
    every model within its timeout and names the stuck one, once dumping every thread's stack;
    lend is refused, not hung."""
    import threading

    import warmserve.worker.worker as worker_module

    monkeypatch.setattr(worker_module, "STATS_TIMEOUT_S", 0.5)
    monkeypatch.setattr(worker_module, "ENGINE_CALL_TIMEOUT_S", 0.5)
    worker.activate("a")
    worker.activate("b")
    release = threading.Event()
    worker._active("a").loop.post(lambda engine: release.wait(10))  # occupies a's loop
    try:
        models = worker.stats()["models"]
        assert "not responding" in models["a"]["error"] and "running" not in models["a"]
        assert models["b"]["running"] == 0 and models["b"]["error"] is None
        assert "no step is running: the loop is busy with another call" in caplog.text
        err = capfd.readouterr().err
        assert "--- thread 'a-loop'" in err and "in wait" in err  # where the loop thread waits
        with pytest.raises(Refused, match="a: engine not responding"):
            worker.lend("a", 4)
    finally:
        release.set()
    assert worker.stats()["models"]["a"]["running"] == 0  # back once the step returns


def test_stats_and_lend_on_an_engine_deactivated_meanwhile(worker, capfd):
    """The worker reads a model's engine loop without its lock; if that loop was just shut
    down, stats leave the model's engine figures out (no false "not responding") and lend is
    refused at once."""
    worker.activate("a")
    worker._active("a").loop.shutdown()  # as a deactivation does, before `loop` is cleared
    entry = worker.stats()["models"]["a"]
    assert entry["error"] is None and "running" not in entry
    assert "not come back" not in capfd.readouterr().err
    with pytest.raises(Refused, match="a was deactivated meanwhile"):
        worker.lend("a", 4)


def test_an_activation_evicts_copies_that_do_not_serve_to_make_room(cache_dir,
                                                                     tiny_checkpoint):
    """A pool with room for one model's weights and KV and another's weights: after `a` is
    deactivated its weights stay (prewarmed), and `b`'s activation evicts them rather than
    being refused for room; an active model is never evicted for another."""
    probe = UniversalWorker(PagePool(HostBackend(PAGE), 96), _models(), ENGINE, cache_dir,
                            host_cache_bytes=0, kv_bytes=16 * PAGE, first_kv_bytes=4 * PAGE)
    weights = probe._layout("a", Shard())[1].weight_pages
    probe.close()
    small = UniversalWorker(PagePool(HostBackend(PAGE), 2 * weights + 2), _models(), ENGINE,
                            cache_dir, host_cache_bytes=64 << 20, kv_bytes=16 * PAGE,
                            first_kv_bytes=4 * PAGE)
    try:
        small.activate("a")
        with pytest.raises(Refused, match="pages for weights and a first KV chunk"):
            small.activate("b")  # `a` serves: it stays
        assert small.stats()["models"]["a"]["state"] == "active"
        small.deactivate("a")
        assert small.stats()["models"]["a"]["state"] == "prewarmed"
        small.activate("b")
        models = small.stats()["models"]
        assert "a" not in models and models["b"]["state"] == "active"
        assert small.generate("b", PROMPT, GREEDY).collect().num_output_tokens == 12
    finally:
        small.close()
