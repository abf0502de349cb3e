"""An engine whose weights and KV cache live in a pool slot: prewarm from the host cache,
activate without copying, lend and reclaim KV pages, evict."""

from __future__ import annotations

import torch

from tests.engine.conftest import run_all
from warmserve.config import EngineConfig
from warmserve.engine.checkpoint import read_arch
from warmserve.engine.engine import create_engine
from warmserve.engine.sampling import SamplingParams
from warmserve.memory.backends import HostBackend
from warmserve.memory.host_cache import HostWeightCache
from warmserve.memory.layout import LayoutProvider, plan_layout
from warmserve.memory.pool import PagePool
from warmserve.memory.prewarm import prewarm_slot

PAGE = 64 << 10
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
CONFIG = EngineConfig(block_size_tokens=16)


def _generate(engine):
    for i in range(3):
        engine.add_request(str(i), list(range(5 + i, 40 + i)), GREEDY)
    return run_all(engine)


def test_prewarmed_slot_serves_identically_and_copies_nothing(tiny_checkpoint):
    arch = read_arch(tiny_checkpoint)
    layout = plan_layout(arch, torch.float32, PAGE, 16, kv_bytes=8 * PAGE)
    assert layout.kv_offset % PAGE == 0
    assert (layout.blocks_per_unit * layout.block_bytes) % PAGE == 0
    cache = HostWeightCache(64 << 20, pin=False)
    host = cache.load("tiny", tiny_checkpoint, arch, layout)
    pool = PagePool(HostBackend(PAGE), 64)
    try:
        slot = pool.create_slot("tiny", layout.capacity_bytes)
        assert prewarm_slot(pool, slot, host, chunk_pages=2).done
        # Activation: map the KV pages beside the weights, then build the engine over the slot.
        pool.map(slot, layout.kv_pages(0, layout.num_blocks)).result()
        provider = LayoutProvider(pool.view(slot), layout, filled=True)
        engine = create_engine(tiny_checkpoint, CONFIG, "float32", "cpu", 256, provider=provider,
                               kv_cache_bytes=layout.kv_bytes)
        base, end = slot.va, slot.va + slot.capacity_bytes
        for param in engine.runner.model.parameters():
            assert base <= param.data_ptr() < end  # every weight is a view into the slot
        assert base <= engine.runner.kv_cache.data_ptr() < end
        reference = create_engine(tiny_checkpoint, CONFIG, "float32", "cpu", 256,
                                  kv_cache_bytes=layout.kv_bytes)
        assert _generate(engine) == _generate(reference)

        # Lend the highest free blocks' pages to another model, then reclaim them.
        bm = engine.block_manager
        units = bm.num_free_blocks // layout.blocks_per_unit
        lent = bm.lend(units * layout.blocks_per_unit)
        pages = layout.kv_pages(min(lent), len(lent))
        pool.unmap(slot, pages).result()
        other = pool.create_slot("other", len(pages) * PAGE)
        pool.map(other, range(len(pages))).result()
        pool.view(other).fill_(0xFF)  # NaN bit patterns where the lent blocks were
        pool.check()
        pool.drop_slot("other").result()
        pool.map(slot, pages).result()
        bm.reclaim(lent)
        assert _generate(engine) == _generate(reference)  # reclaimed blocks hold garbage: fine
    finally:
        pool.close()


def test_host_cache_is_lru_and_refuses_what_cannot_fit(tiny_checkpoint):
    import pytest

    from warmserve.memory.host_cache import HostCacheFullError

    arch = read_arch(tiny_checkpoint)
    layout = plan_layout(arch, torch.float32, PAGE, 16, kv_bytes=PAGE)
    cache = HostWeightCache(2 * layout.weight_bytes + 10, pin=False)
    seen = []
    for key in ("a", "b"):
        cache.load(key, tiny_checkpoint, arch, layout, lambda *p: seen.append(p))
    assert seen[-1] == ("b", layout.weight_bytes, layout.weight_bytes)
    assert [p[1] for p in seen if p[0] == "a"] == sorted(p[1] for p in seen if p[0] == "a")
    cache.get("a")
    cache.load("c", tiny_checkpoint, arch, layout)
    assert "a" in cache and "c" in cache and "b" not in cache
    with pytest.raises(HostCacheFullError, match="exceed the host cache"):
        HostWeightCache(100, pin=False).load("x", tiny_checkpoint, arch, layout)


def test_layout_with_blocks_that_divide_pages_badly(smollm2_checkpoint):
    """SmolLM2 fp32: a 16-token block is 720 KiB, so 32 MiB pages hold no whole number of
    blocks. The cache is still the size asked for; only lending becomes coarse."""
    arch = read_arch(smollm2_checkpoint)
    layout = plan_layout(arch, torch.float32, 32 << 20, 16, kv_bytes=256 << 20)
    assert layout.block_bytes == 737280
    assert layout.num_blocks == (256 << 20) // 737280
    assert layout.capacity_bytes - layout.kv_offset < (256 << 20) + (32 << 20)
    assert (layout.blocks_per_unit * layout.block_bytes) % (32 << 20) == 0
