"""The page pool over CUDA virtual memory, and an engine over a prewarmed slot, on the GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PAGE = 2 << 20


@pytest.fixture
def pool():
    from warmserve.memory.backends import CudaVmmBackend
    from warmserve.memory.pool import PagePool

    pool = PagePool(CudaVmmBackend(0, PAGE), 32)
    yield pool
    pool.close()


def test_cuda_remap_keeps_physical_pages(pool):
    a = pool.create_slot("a", 4 * PAGE)
    pool.map(a, range(4)).result()
    pool.view(a).fill_(7)
    b = pool.create_slot("b", 32 * PAGE)
    pool.map(b, range(28)).result()
    pool.unmap(a, [2, 3]).result()
    pool.map(b, [28, 29]).result()
    torch.cuda.synchronize()
    assert set(pool.view(b)[28 * PAGE: 30 * PAGE].unique().tolist()) == {7}
    assert pool.view(a)[:2 * PAGE].float().mean().item() == 7
    pool.check()


def test_engine_over_prewarmed_cuda_slot(pool, tiny_checkpoint):
    from tests.engine.conftest import run_all
    from warmserve.config import EngineConfig
    from warmserve.engine.checkpoint import read_arch
    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams
    from warmserve.memory.host_cache import HostWeightCache
    from warmserve.memory.layout import LayoutProvider, plan_layout
    from warmserve.memory.prewarm import prewarm_slot

    arch = read_arch(tiny_checkpoint)
    layout = plan_layout(arch, torch.float32, PAGE, 16, kv_bytes=4 * PAGE)
    host = HostWeightCache(1 << 30).load("tiny", tiny_checkpoint, arch, layout)
    slot = pool.create_slot("tiny", layout.capacity_bytes)
    assert prewarm_slot(pool, slot, host).done
    pool.map(slot, layout.kv_pages(0, layout.num_blocks)).result()
    config = EngineConfig(max_cuda_graph_batch=8)
    engine = create_engine(tiny_checkpoint, config, "float32", "cuda", 256,
                           provider=LayoutProvider(pool.view(slot), layout, filled=True),
                           kv_cache_bytes=layout.kv_bytes)
    reference = create_engine(tiny_checkpoint, config, "float32", "cuda", 256,
                              kv_cache_bytes=layout.kv_bytes)
    outputs = []
    for eng in (engine, reference):
        for i in range(4):
            eng.add_request(str(i), list(range(3 + i, 50 + i)),
                            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        outputs.append(run_all(eng))
    assert outputs[0] == outputs[1]
