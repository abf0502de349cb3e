"""A worker process on the GPU: CUDA VMM pool, prewarm, activate, generate over RPC."""

from __future__ import annotations

import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_worker_process(tmp_path, cache_dir, tiny_checkpoint):
    from warmserve.cluster.local import LocalWorkerProcess
    from warmserve.engine.sampling import SamplingParams

    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "g", "host_memory_gib": 16, "pinned_cache_gib": 4,
                               "devices": [{"type": "cuda", "count": 1, "memory_gib": 80}]}]},
        "models": [{"name": m, "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 512} for m in ("a", "b")],
        "engine": {"kv_cache_gib": 0.25, "max_cuda_graph_batch": 8},
        "policy": {"pool_memory_fraction": 0.2},
    }))
    worker = LocalWorkerProcess(str(config), "g", 0, cache_dir, start_timeout_s=300)
    try:
        client = worker.client
        client.prewarm("a", wait=True)
        assert client.stats()["models"]["a"]["runner_ready"]  # graphs captured ahead
        client.activate("a")
        client.activate("b")  # cold
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        a = [t for o in client.generate("a", list(range(9, 60)), params) for t in o.token_ids]
        b = [t for o in client.generate("b", list(range(9, 60)), params) for t in o.token_ids]
        assert a == b and len(a) == 16  # same weights, same answer
        client.deactivate("a")  # KV pages unmapped; the runner and its CUDA graphs kept
        client.activate("a")  # pages mapped again at the same addresses
        again = [t for o in client.generate("a", list(range(9, 60)), params)
                 for t in o.token_ids]
        assert again == a
        client.deactivate("b")
        client.evict("b")
        assert set(client.stats()["models"]) == {"a"}
    finally:
        worker.close()
