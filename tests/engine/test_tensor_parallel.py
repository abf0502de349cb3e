"""A tensor-parallel engine over real processes (gloo on the CPU): the driver's outputs are the
unsplit engine's, through chunked prefill and preemption, and every follower runs every step."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from warmserve.config import EngineConfig
from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.engine.engine import create_engine, create_runner
from warmserve.engine.loader import TorchProvider
from warmserve.engine.models.llama import LlamaForCausalLM
from warmserve.engine.parallel import TensorParallel, follow
from warmserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
PROMPTS = {f"r{i}": list(range(10 + i, 10 + i + 5 + 7 * i)) for i in range(5)}
BLOCK_BYTES = 4 * 2 * 2 * 2 * 16 * 4  # a block of 4 tokens of the tiny shape, fp32, unsplit
# Few blocks (so sequences are preempted) and a small token budget (so prompts are chunked).
CONFIG = EngineConfig(block_size_tokens=4, max_tokens_per_step=16)
KV_BYTES = BLOCK_BYTES * 24


def _generate(engine) -> dict[str, list]:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY)
    logprobs: dict[str, list] = {}
    while engine.has_work():
        for out in engine.step():
            logprobs.setdefault(out.request_id, []).extend(out.logprobs)
    return logprobs


def _rank(rank: int, size: int, store: str, checkpoint: str, out_dir: str, device: str,
          config: EngineConfig, kv_bytes: int) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    tp = TensorParallel.create(tuple(range(size)), device)
    # the driver's device could hold twice the blocks the others can: all hold the least
    budget = kv_bytes if rank == 0 else kv_bytes // size
    args = (Path(checkpoint), config, "float32", device)
    kwargs = {"max_context": 256, "kv_cache_bytes": budget, "tp": tp,
              "provider": TorchProvider(device, poison=True)}
    if tp.is_driver:
        engine = create_engine(*args, **kwargs)
        result = {"logprobs": _generate(engine), "blocks": engine.block_manager.num_usable_blocks,
                  "preemptions": engine.stats().num_preemptions,
                  "graphs": sorted(engine.runner._graphs)}
        engine.runner.close()
    else:
        runner = create_runner(*args, **kwargs)
        result = {"steps": follow(runner, tp), "blocks": runner.scratch_block}
    dist.barrier()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def run_split(size: int, checkpoint: Path, tmp_path: Path, device: str = "cpu",
              config: EngineConfig = CONFIG, kv_bytes: int = KV_BYTES) -> list[dict]:
    """`size` processes, one rank each, run the prompts; what each rank reports."""
    mp.start_processes(_rank, args=(size, str(tmp_path / "store"), str(checkpoint),
                                    str(tmp_path), device, config, kv_bytes),
                       nprocs=size, start_method="spawn")
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(size)]


def check_split_equals_whole(whole: dict, driver: dict, followers: list[dict]) -> None:
    """The same tokens, the same log-probabilities (summed in another order), as many
    blocks, and every follower ran as many steps as the others."""
    got = driver["logprobs"]
    assert {r: [lp.token_id for lp in lps] for r, lps in got.items()} == {
        r: [lp.token_id for lp in lps] for r, lps in whole.items()}
    for rid, lps in whole.items():
        assert [lp.logprob for lp in got[rid]] == pytest.approx(
            [lp.logprob for lp in lps], abs=1e-4)
    assert all(f["blocks"] == driver["blocks"] for f in followers)
    assert all(f["steps"] > 0 and f["steps"] == followers[0]["steps"] for f in followers)


def test_a_split_engine_samples_what_the_whole_one_does(tiny_checkpoint, tmp_path):
    whole = create_engine(tiny_checkpoint, CONFIG, "float32", "cpu", max_context=256,
                          kv_cache_bytes=KV_BYTES, provider=TorchProvider(poison=True))
    expected = _generate(whole)
    driver, *followers = run_split(2, tiny_checkpoint, tmp_path)
    check_split_equals_whole(expected, driver, followers)
    # a follower's half of the budget holds half-sized blocks: as many as the whole engine's
    assert driver["blocks"] == whole.block_manager.num_usable_blocks
    assert driver["preemptions"] == whole.stats().num_preemptions > 0  # recompute went too


def test_only_the_other_ranks_follow_and_groups_are_powers_of_two():
    with pytest.raises(ValueError, match="power of two of distinct processes"):
        TensorParallel.create((0, 1, 2), "cpu")
    with pytest.raises(ValueError, match="power of two of distinct processes"):
        TensorParallel.create((0, 0), "cpu")
    driver = TensorParallel(0, (0, 1), None, None)
    with pytest.raises(ValueError, match="only the other ranks follow"):
        follow(None, driver)


def test_a_model_whose_kv_heads_do_not_split_is_refused_by_name():
    with torch.device("meta"), pytest.raises(ValueError, match="2 KV heads do not split over "
                                                               "tensor_parallel=4"):
        LlamaForCausalLM(SYNTH_ARCHS["tiny"], 0, 4)
