"""Does the simulator's instance behave like our engine? The same requests, both ways.

    python benchmarks/sim_fidelity.py replay --shape llama-2-7b --rates 8,16,24 --out DIR  # GPU
    python benchmarks/sim_fidelity.py compare DIR                                          # CPU

`replay` sends Poisson arrivals at each rate, with the Azure conv trace's token lengths (inputs
capped as the `paper` preset caps them), through one engine on one GPU in real time, and
writes each request's arrival, lengths, TTFT and TPOT to DIR/replay_<rate>.csv (the simulator's
request-file format plus the two measured columns), and the engine's busy and prefill seconds
and preemptions to DIR/replay_<rate>.json. `compare` runs the simulator on those
files (one GPU, one model, one instance that batches up to the engine's bound: the `muxserve`
policy set, which plans exactly that) and prints measured against simulated TTFT and TPOT.

Measures and prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np

MAX_INPUT = 1024  # the paper preset's cap
MAX_OUTPUT = 512
MAX_SEQS = 256  # the simulator's engine bound (SimConfig.max_batch)
STEP_TOKENS = 4096  # the h100-node config's engine.max_tokens_per_step
KV_GIB = 54.0  # what the simulator leaves a 7B on an H100: 0.9 x 80 GB - 13.5 GB


def requests(rate: float, duration_s: float, seed: int) -> list[tuple[float, int, int]]:
    from warmserve.workload.traces import load_azure_llm

    trace = load_azure_llm("conv")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s * 1.5)))
    arrivals = arrivals[arrivals < duration_s]
    rows = rng.integers(0, len(trace.input_tokens), len(arrivals))
    n_in = np.clip(trace.input_tokens[rows], 1, MAX_INPUT)
    n_out = np.clip(trace.output_tokens[rows], 2, MAX_OUTPUT)
    return [(float(a), int(i), int(o)) for a, i, o in zip(arrivals, n_in, n_out, strict=True)]


def replay(args: argparse.Namespace) -> None:
    import torch

    from warmserve.config import EngineConfig
    from warmserve.engine.checkpoint import write_synthetic
    from warmserve.engine.engine import create_engine
    from warmserve.engine.sampling import SamplingParams

    path = Path(args.cache_dir) / "synth" / args.shape
    if not (path / "config.json").exists():
        write_synthetic(args.shape, path, dtype=args.dtype, device=args.device)
    config = EngineConfig(max_num_seqs=MAX_SEQS, max_tokens_per_step=STEP_TOKENS,
                          kv_cache_gib=args.kv_gib, max_cuda_graph_batch=MAX_SEQS)
    engine = create_engine(path, config, args.dtype, args.device, max_context=4096)
    vocab = engine.runner.model.arch.vocab_size
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(300, min(vocab, 30000), n).tolist()

    for i in range(8):  # warm-up: every code path once
        engine.add_request(f"warm-{i}", ids(MAX_INPUT), SamplingParams(max_tokens=16,
                                                                      ignore_eos=True))
    while engine.has_work():
        engine.step()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for rate in (float(r) for r in args.rates.split(",")):
        reqs = requests(rate, args.duration, args.seed)
        before = engine.stats()
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        nxt, start = 0, time.perf_counter()
        while len(done) < len(reqs):
            now = time.perf_counter() - start
            while nxt < len(reqs) and reqs[nxt][0] <= now:
                _, n_in, n_out = reqs[nxt]
                engine.add_request(str(nxt), ids(n_in), SamplingParams(
                    max_tokens=n_out, ignore_eos=True, temperature=0))
                nxt += 1
            if not engine.has_work():
                time.sleep(max(0.0, min(reqs[nxt][0] - now, 0.01)))
                continue
            outputs = engine.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter() - start
            for o in outputs:
                first.setdefault(o.request_id, t)
                if o.finished:
                    done[o.request_id] = t
        with open(out / f"replay_{rate:g}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arrival_s", "model", "input_tokens", "output_tokens", "ttft_s",
                        "tpot_s"])
            for k, (a, n_in, n_out) in enumerate(reqs):
                f1, fin = first[str(k)], done[str(k)]
                w.writerow([f"{a:.6f}", args.shape, n_in, n_out, f"{f1 - a:.6f}",
                            f"{(fin - f1) / (n_out - 1):.6f}"])
        after, wall = engine.stats(), time.perf_counter() - start
        summary = {"requests": len(reqs), "wall_s": wall,
                   "busy_s": after.busy_s - before.busy_s,
                   "prefill_s": after.prefill_s - before.prefill_s,
                   "preemptions": after.num_preemptions - before.num_preemptions}
        (out / f"replay_{rate:g}.json").write_text(json.dumps(summary, indent=2))
        print(f"rate {rate:g}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float)
                                           else f"{k} {v}" for k, v in summary.items()),
              flush=True)


def compare(args: argparse.Namespace) -> None:
    from warmserve.config import load_config
    from warmserve.sim.profiles import load_profile
    from warmserve.sim.run import build_scenario, simulate

    profile = load_profile(args.profile)
    base = load_config("h100-node")
    rows = []
    for path in sorted(Path(args.dir).glob("replay_*.csv"), key=lambda p: float(p.stem[7:])):
        measured = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
        shape = str(measured["model"][0])
        model = base.models[0].model_copy(update={"name": shape,
                                                  "checkpoint": f"synth:{shape}"})
        config = base.model_copy(update={"models": [model], "engine": base.engine.model_copy(
            update={"max_tokens_per_step": STEP_TOKENS})})
        scenario = build_scenario(str(path), config, profile, num_gpus=1, gpus_per_node=1)
        sim = simulate(scenario, ["muxserve"], config, profile)["muxserve"]
        order = np.argsort(measured["arrival_s"], kind="stable")
        for what, real, simulated in (("TTFT", measured["ttft_s"][order], sim.ttft_s),
                                      ("TPOT", measured["tpot_s"][order], sim.tpot_s)):
            rows.append((path.stem[7:], what, *(_stats(real)), *(_stats(simulated))))
    print(f"\n{'rate':>5} {'':5} {'engine mean':>12} {'p50':>9} {'p90':>9} {'p99':>9}"
          f" {'sim mean':>10} {'p50':>9} {'p90':>9} {'p99':>9}   (ms)")
    for rate, what, *values in rows:
        print(f"{rate:>5} {what:5} " + " ".join(f"{v * 1000:>9.1f}" for v in values[:4])
              + "   " + " ".join(f"{v * 1000:>9.1f}" for v in values[4:]))


def _stats(x: np.ndarray) -> tuple[float, float, float, float]:
    x = x[~np.isnan(x)]
    return (statistics.fmean(x), *np.percentile(x, [50, 90, 99]))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("replay", help="Replay Poisson arrivals through one engine (GPU).")
    r.add_argument("--shape", default="llama-2-7b")
    r.add_argument("--rates", default="8,16,24", help="Requests per second, comma-separated.")
    r.add_argument("--duration", type=float, default=60.0, help="Seconds of arrivals per rate.")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--kv-gib", type=float, default=KV_GIB)
    r.add_argument("--cache-dir", default="/tmp/warmserve-bench")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="Simulate the replayed requests and compare (CPU).")
    c.add_argument("dir")
    c.add_argument("--profile", default="h100")
    args = ap.parse_args()
    replay(args) if args.verb == "replay" else compare(args)


if __name__ == "__main__":
    main()
