"""A tensor-parallel engine over two CUDA devices: NCCL's all-reduce inside the forward and
inside the decode CUDA graphs, against the unsplit engine on one device."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_tensor_parallel import (
    KV_BYTES,
    PROMPTS,
    _generate,
    check_split_equals_whole,
    run_split,
)
from warmserve.config import EngineConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

# 16-token blocks: the paged-decode kernel's, so decode steps replay graphs
CONFIG = EngineConfig(block_size_tokens=16, max_tokens_per_step=64, max_cuda_graph_batch=8)


def test_a_split_engine_on_two_gpus_samples_what_one_gpu_does(tiny_checkpoint, tmp_path):
    from warmserve.engine.engine import create_engine
    from warmserve.engine.loader import TorchProvider

    whole = create_engine(tiny_checkpoint, CONFIG, "float32", "cuda", max_context=256,
                          kv_cache_bytes=KV_BYTES * 8, provider=TorchProvider("cuda", poison=True))
    assert whole.runner._graphs, "the unsplit engine captured no graphs: nothing compared"
    expected = _generate(whole)
    driver, *followers = run_split(2, tiny_checkpoint, tmp_path, "cuda", CONFIG, KV_BYTES * 8)
    assert driver["graphs"] == sorted(whole.runner._graphs)
    assert len(expected) == len(PROMPTS)
    check_split_equals_whole(expected, driver, followers)
