"""The first steps of fresh engines: which are slow, and which Triton kernel variants each
compiles (a live request waits for any compile in its step).

    python benchmarks/first_steps.py                      # llama-3-8b shape, 4 layers, cold cache
    python benchmarks/first_steps.py --layers 32 --requests 200 --warm-cache
    python benchmarks/first_steps.py --device cpu --shape tiny --layers 2 --requests 6 --kv-gib 0.05

Two engines of the same shape are built one after the other in this process, as a universal
worker builds them; each is fed an open stream of requests (prompts of 17 to 2,000 tokens,
10 to 300 output tokens, one new request every third step) until all are done, and every step
is timed. Without `--warm-cache` Triton compiles into an empty cache directory, as on a fresh
host. Prints the steps over `--slow-ms` or that compiled a variant, then a table. Measures;
asserts nothing. On the CPU (no graphs, no Triton) it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import time
from pathlib import Path


def kernel_variants(modules) -> dict[str, int]:
    """How many compiled variants each Triton kernel of `modules` holds, over devices."""
    counts = {}
    for module in modules:
        for name in dir(module):
            fn = getattr(module, name)
            if type(fn).__name__ == "JITFunction":
                counts[name] = sum(len(cache[0]) for cache in fn.device_caches.values())
    return counts


PROMPT_TOKENS = (17, 37, 64, 130, 259, 511, 777, 1024, 1500, 2000)
MAX_OUTPUT_TOKENS = 300


def drive(engine, label: str, seed: int, num_requests: int, modules, slow_s: float) -> dict:
    import torch

    from warmserve.engine.sampling import SamplingParams

    rng = random.Random(seed)
    vocab = engine.runner.model.arch.vocab_size
    most_out = min(MAX_OUTPUT_TOKENS, engine.max_context // 4)  # a small test model's context
    lengths = [n for n in PROMPT_TOKENS if n + most_out <= engine.max_context]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, compiled, added = [], 0, 0
    counts = kernel_variants(modules)
    while added < num_requests or engine.has_work():
        if added < num_requests and len(times) % 3 == 0:
            n = rng.choice(lengths)
            engine.add_request(f"{label}-{added}", [rng.randrange(300, min(vocab, 30000))
                                                    for _ in range(n)],
                               SamplingParams(max_tokens=rng.randrange(10, most_out),
                                              ignore_eos=True))
            added += 1
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        took = time.perf_counter() - start
        times.append(took)
        before, counts = counts, kernel_variants(modules)
        new = {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)}
        compiled += sum(new.values())
        if took > slow_s or new:
            print(f"  {label} step {len(times) - 1:4d}: {took * 1e3:7.1f} ms  "
                  f"({engine.last_step_summary()}){'  compiled ' + str(new) if new else ''}")
    return {"steps": len(times), "first_100_s": sum(times[:100]), "all_s": sum(times),
            "over_200ms": sum(t > 0.2 for t in times),
            "over_200ms_s": sum(t for t in times if t > 0.2), "compiled": compiled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=4, help="Decoder layers kept of --shape.")
    ap.add_argument("--requests", type=int, default=120, help="Requests per engine.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-gib", type=float, default=6.0)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "warmserve-bench"))
    ap.add_argument("--warm-cache", action="store_true",
                    help="Keep Triton's own cache directory (default: a new, empty one).")
    ap.add_argument("--slow-ms", type=float, default=100.0)
    args = ap.parse_args()
    if not args.warm_cache:  # before Triton is imported
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")

    import torch

    from warmserve.config import EngineConfig
    from warmserve.engine.arch import SYNTH_ARCHS
    from warmserve.engine.checkpoint import write_random_checkpoint
    from warmserve.engine.engine import create_engine
    from warmserve.engine.layers import triton_decode, triton_ops

    modules = (triton_ops, triton_decode)
    arch = dataclasses.replace(SYNTH_ARCHS[args.shape], num_layers=args.layers)
    rows = []
    for label, seed in (("first", 1), ("second", 2)):
        path = Path(args.cache_dir) / "synth" / f"{args.shape}-{args.layers}-layers-{seed}"
        if not (path / "config.json").exists():
            write_random_checkpoint(arch, path, args.dtype, seed=seed, device=args.device)
        start = time.perf_counter()
        config = EngineConfig(max_num_seqs=256, kv_cache_gib=args.kv_gib, use_cuda_graphs=True)
        engine = create_engine(path, config, args.dtype, args.device, max_context=4096)
        built_s = time.perf_counter() - start
        result = drive(engine, label, seed, args.requests, modules, args.slow_ms / 1e3)
        rows.append((label, built_s, result))
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{card}, {args.shape} with {args.layers} layers, "
          f"{'warm' if args.warm_cache else 'cold'} Triton cache, {args.requests} requests each")
    print("| engine | built | steps | first 100 steps | all steps | steps over 200 ms "
          "| their time | variants compiled in steps |")
    print("|---|---|---|---|---|---|---|---|")
    for label, built_s, r in rows:
        print(f"| {label} | {built_s:.2f} s | {r['steps']} | {r['first_100_s']:.2f} s "
              f"| {r['all_s']:.2f} s | {r['over_200ms']} | {r['over_200ms_s']:.2f} s "
              f"| {r['compiled']} |")


if __name__ == "__main__":
    main()
