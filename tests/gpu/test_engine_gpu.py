"""Engine on CUDA: CUDA-graph decode and the CUDA engine against references."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import run_all
from warmserve.config import EngineConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_graph_decode_equals_eager_greedy(tiny_checkpoint):
    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams

    outputs = {}
    for graphs in (False, True):
        config = EngineConfig(kv_cache_gib=0.05, use_cuda_graphs=graphs, max_cuda_graph_batch=8)
        engine = create_engine(tiny_checkpoint, config, "float32", "cuda", 512)
        for i in range(5):
            engine.add_request(str(i), list(range(3 + i, 40 + 3 * i)),
                               SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        outputs[graphs] = run_all(engine)
    assert outputs[True] == outputs[False]


def test_cuda_engine_equals_cpu_engine_greedy(tiny_checkpoint):
    """The CUDA path (fused Triton kernels, paged decode, graphs) against the CPU reference."""
    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams

    outputs = {}
    for device in ("cpu", "cuda"):
        config = EngineConfig(kv_cache_gib=0.05, max_cuda_graph_batch=8, max_tokens_per_step=64)
        engine = create_engine(tiny_checkpoint, config, "float32", device, 512)
        for i in range(6):
            engine.add_request(str(i), list(range(5 + i, 60 + 9 * i)),
                               SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        outputs[device] = run_all(engine)
    assert outputs["cuda"] == outputs["cpu"]


def test_engines_built_at_once_in_threads_all_capture_their_graphs(tiny_checkpoint):
    """A worker reloading several models builds their runners on several threads at once;
    graph capture must not break another thread's capture (it did: cudaErrorStreamCapture*)."""
    from concurrent.futures import ThreadPoolExecutor

    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams

    config = EngineConfig(kv_cache_gib=0.05, max_cuda_graph_batch=16)

    def build(i):
        return create_engine(tiny_checkpoint, config, "float32", "cuda", 512)

    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(build, range(4)))
    outputs = []
    for engine in engines:
        assert engine.runner._graphs  # every one captured its decode graphs
        engine.add_request("r", list(range(5, 40)),
                           SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        outputs.append(run_all(engine))
    assert all(o == outputs[0] for o in outputs)


def test_requests_handed_over_on_cuda_resume_as_if_never_moved(tiny_checkpoint):
    """Four requests stopped mid-decode on one CUDA engine (graphs on) and resumed on another
    give the greedy tokens of an uninterrupted run."""
    from dataclasses import replace

    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams

    config = EngineConfig(kv_cache_gib=0.05, max_cuda_graph_batch=8)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = {str(i): list(range(7 + i, 50 + 5 * i)) for i in range(4)}

    def engine():
        return create_engine(tiny_checkpoint, config, "float32", "cuda", 512)

    whole = engine()
    for rid, prompt in prompts.items():
        whole.add_request(rid, prompt, params)
    expected = run_all(whole)
    first = engine()
    for rid, prompt in prompts.items():
        first.add_request(rid, prompt, params)
    sent: dict[str, list[int]] = {rid: [] for rid in prompts}
    for _ in range(6):
        for out in first.step():
            sent[out.request_id].extend(out.token_ids)
    second = engine()
    for out in first.hand_over_all():
        resume = out.resume
        second.add_request(out.request_id, resume.token_ids,
                           replace(params, max_tokens=32 - resume.num_output_tokens), resume)
    rest = run_all(second)
    assert {rid: sent[rid] + rest[rid] for rid in prompts} == expected


_SECOND_GPU_LOOP = """
import sys, torch
from pathlib import Path
from warmserve.config import EngineConfig
from warmserve.engine.engine import create_engine
from warmserve.engine.loop import EngineLoop
from warmserve.engine.sampling import SamplingParams
params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
prompts = [list(range(5 + i, 40 + i)) for i in range(6)]  # past the graphs' batch of 4
results = {}
for device in ("cpu", "cuda:1"):
    config = EngineConfig(kv_cache_gib=0.05, max_cuda_graph_batch=4)
    if device != "cpu":
        torch.cuda.set_device(device)  # as the worker's thread that builds the engine does
    engine = create_engine(Path(sys.argv[1]), config, "float32", device, 512)
    loop = EngineLoop(engine, "t")  # its thread starts on device 0
    try:
        streams = [loop.submit(p, params) for p in prompts]
        results[device] = [s.collect().token_ids for s in streams]
    finally:
        loop.shutdown()
assert results["cuda:1"] == results["cpu"], results
print("same tokens")
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_engine_loop_on_a_second_gpu_runs_its_kernels_there(tiny_checkpoint):
    """A worker of the second GPU runs its engine loop on a thread of its own, which starts on
    device 0: the Triton decode then failed ("Pointer argument cannot be accessed from
    Triton") in the first live run on two GPUs. The loop makes its engine's device current.
    Run in a process of its own that uses only that GPU, as a worker does (one process that
    launched Triton kernels on GPU 0 first still fails to capture graphs on GPU 1: not fixed,
    and not how workers run); its greedy tokens are the CPU engine's."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SECOND_GPU_LOOP, str(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same tokens" in done.stdout, done.stderr[-3000:]
