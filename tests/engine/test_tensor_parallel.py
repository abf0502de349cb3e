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
from warmserve.engine.parallel import Shard, TensorParallel, follow
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


def _rank(rank: int, size: int, port: int, checkpoint: str, out_dir: str, device: str,
          config: EngineConfig, kv_bytes: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    tp = TensorParallel.join(store, "instance-0", Shard(rank, size),
                             torch.device(f"cuda:{rank}" if device == "cuda" else "cpu"))
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
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    tp.close()


def run_split(size: int, checkpoint: Path, tmp_path: Path, device: str = "cpu",
              config: EngineConfig = CONFIG, kv_bytes: int = KV_BYTES) -> list[dict]:
    """`size` processes, one rank each, run the prompts; what each rank reports."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.start_processes(_rank, args=(size, store.port, str(checkpoint), str(tmp_path), device,
                                    config, kv_bytes),
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


def test_only_the_other_ranks_follow_and_shards_are_powers_of_two():
    with pytest.raises(ValueError, match="tensor_parallel=3: a model splits over a power of two"):
        Shard(0, 3)
    with pytest.raises(ValueError, match="rank 2 of a model split 2 ways"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="no group to join"):
        TensorParallel.join(None, "i", Shard(), torch.device("cpu"))
    driver = TensorParallel(Shard(0, 2), None, None)
    with pytest.raises(ValueError, match="only the other ranks follow"):
        follow(None, driver)


def test_a_rank_whose_partners_never_come_fails_to_join_in_time():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.raises(TimeoutError, match="alone: rank 0/2: the other ranks did not join "
                                           "within 1 s"):
        TensorParallel.join(store, "alone", Shard(0, 2), torch.device("cpu"), timeout_s=1)


def test_a_model_whose_kv_heads_do_not_split_is_refused_by_name():
    with torch.device("meta"), pytest.raises(ValueError, match="2 KV heads do not split over "
                                                               "tensor_parallel=4"):
        LlamaForCausalLM(SYNTH_ARCHS["tiny"], 0, 4)
