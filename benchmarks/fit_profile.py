"""A simulator cost-profile entry fitted from engine_bench.py results, for the whole model.

    python benchmarks/fit_profile.py l10.json l20.json [--tp 4] [--profile h100]

Each result is one run of `engine_bench.py --shape S --layers N --out F` (all of one shape).
Every timing is fitted as  t(N) = a + N x b  over the runs (a: embedding, head, sampling, host
work; b: one decoder layer) and taken at the shape's full depth; one run without --layers is
used as it is. Then, at full depth, a prefill costs base + tokens x per-token (through the two
prompt lengths) and a decode step base + (batch - 1) x per-sequence (least squares over the
batches), less the KV reads of the timed sequences' ~162 tokens, which the profile charges
per context token (`kv_read_overhead`). That is the model on one GPU with room for it; `--tp`
spreads it over more GPUs by the profile's tensor_parallel rule (`ModelCost.on_gpus`).
Weights and KV are counted in bf16. Prints the YAML entry; asserts nothing. To check the
method on a model that fits, fit llama-2-13b from 10 and 20 layers and compare with its full
40-layer run.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.sim.profiles import ModelCost, load_profile

# engine_bench's TPOT: 128-token prompts, the median step timed about 34 tokens later
TIMED_CONTEXT = 162


def at_full_depth(runs: list[dict], key: str) -> float:
    layers = np.array([r["layers"] for r in runs], dtype=float)
    values = np.array([r[key] for r in runs])
    full = runs[0]["full_layers"]
    if len(runs) == 1:
        if layers[0] != full:
            raise SystemExit(f"one run of {layers[0]:.0f} layers: give runs at two depths")
        return float(values[0])
    per_layer, fixed = np.polyfit(layers, values, 1)
    return float(fixed + per_layer * full)


def fit(runs: list[dict]) -> dict[str, float]:
    keys = runs[0].keys()
    ttft = sorted((int(m[1]), at_full_depth(runs, k)) for k in keys
                  if (m := re.fullmatch(r"ttft_(\d+)_s", k)))
    tpot = sorted((int(m[1]), at_full_depth(runs, k)) for k in keys
                  if (m := re.fullmatch(r"tpot_b(\d+)_s", k)))
    (n1, t1), (n2, t2) = ttft[0], ttft[-1]
    per_token = (t2 - t1) / (n2 - n1)
    batches = np.array([b - 1 for b, _ in tpot], dtype=float)
    per_seq, base = np.polyfit(batches, [t for _, t in tpot], 1) if len(tpot) > 1 else (0.0,
                                                                                       tpot[0][1])
    return {"prefill_base_s": max(0.0, t1 - n1 * per_token), "prefill_s_per_token": per_token,
            "decode_base_s": float(base), "decode_per_seq_s": float(per_seq),
            "ttft": ttft, "tpot": tpot}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--tp", type=int, default=1, help="GPUs of the profile entry")
    ap.add_argument("--profile", default="h100", help="profile whose tensor_parallel rule applies")
    args = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in args.results]
    shapes = {r.get("shape") for r in runs}
    if len(shapes) != 1 or None in shapes:
        raise SystemExit(f"results must all be engine_bench runs of one --shape, got {shapes}")
    shape = shapes.pop()
    arch = SYNTH_ARCHS[shape]
    f = fit(runs)
    scaling = next(iter(load_profile(args.profile).models.values())).scaling
    cost = ModelCost(shape, 1, arch.num_parameters() * 2, arch.kv_bytes_per_token * 2,
                     f["decode_base_s"], f["decode_per_seq_s"], f["prefill_s_per_token"],
                     f["prefill_base_s"], scaling)
    # The profile charges context KV reads apart: take out those of the timed sequences.
    per_seq = f["decode_per_seq_s"] - TIMED_CONTEXT * cost.decode_s_per_context_token
    cost = replace(cost, decode_per_seq_s=max(0.0, per_seq)).on_gpus(args.tp)
    depth = ", ".join(str(r["layers"]) for r in runs)
    print(f"# {shape} fitted from runs of {depth} layers (of {arch.num_layers}) on "
          f"{runs[0].get('device')}")
    print("#   full depth, one GPU: " + ", ".join(f"TTFT {n} tokens {t * 1e3:.2f} ms"
                                                   for n, t in f["ttft"]) + "; "
          + ", ".join(f"TPOT batch {b} {t * 1e3:.2f} ms" for b, t in f["tpot"]))
    print(f"  {shape}: {{params_b: {arch.num_parameters() / 1e9:.2f}, tp: {args.tp}, "
          f"weight_gb: {arch.num_parameters() * 2 / 1e9:.2f}, "
          f"kv_bytes_per_token: {arch.kv_bytes_per_token * 2},")
    print(f"      decode_base_ms: {cost.decode_base_s * 1e3:.2f}, "
          f"decode_per_seq_ms: {cost.decode_per_seq_s * 1e3:.3f}, "
          f"prefill_us_per_token: {cost.prefill_s_per_token * 1e6:.1f}, "
          f"prefill_base_ms: {cost.prefill_base_s * 1e3:.1f}}}")


if __name__ == "__main__":
    main()
