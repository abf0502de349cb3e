"""Tensor-parallel scaling of a Llama decoder, measured: what the simulator's profile rule for a
model over more GPUs assumes (profiles/h100.yaml, `tensor_parallel`: prefill and per-sequence
decode work divide at `efficiency` per doubling of GPUs; a decode step keeps a fixed part,
divides its weight reads, and adds all-reduces).

    torchrun --standalone --nproc_per_node N benchmarks/tp_bench.py --shape llama-2-13b \\
        [--layers 4] [--tokens 512,2048] [--batches 1,32,128] [--context 512] [--json OUT]
    python benchmarks/tp_bench.py --compare tp1.json tp2.json tp4.json

Our engine has no tensor parallelism, so this measures the same layer math split the usual
way (Megatron-style): each rank holds its share of the attention heads and of the MLP's
intermediate columns, and the ranks all-reduce twice a layer, after the attention output and
after the MLP. Weights are random bf16 of the shape's real dimensions. RoPE is left out (an
elementwise rotation, under 1% of a layer's time). Each case is captured in a CUDA graph with
its all-reduces, as an engine runs its steps (`--no-graphs`: eagerly, launches included), and
timed with CUDA events, the median of `--repeats` replays after warm-up, for `--layers`
layers; reported per layer and scaled to the model's depth. `--compare` prints, for each
degree against one GPU, the efficiency per doubling e = (t1 / (N tN)) ^ (1 / log2 N) of
prefill time and of the decode slope (the per-sequence cost between the smallest and largest
batch), which is what the profile's `efficiency` stands for. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from warmserve.engine.arch import SYNTH_ARCHS, ModelArch


@dataclass
class LayerShard:
    """One decoder layer's weights held by one rank (nn.Linear layout: [out, in])."""

    norm_in: torch.Tensor
    wq: torch.Tensor  # [heads_local * head_dim, hidden]
    wk: torch.Tensor  # [kv_heads_local * head_dim, hidden]
    wv: torch.Tensor
    wo: torch.Tensor  # [hidden, heads_local * head_dim]: a partial sum per rank
    norm_post: torch.Tensor
    w_gate: torch.Tensor  # [intermediate_local, hidden]
    w_up: torch.Tensor
    w_down: torch.Tensor  # [hidden, intermediate_local]: a partial sum per rank


def check_divisible(arch: ModelArch, world: int) -> None:
    for name, n in (("num_heads", arch.num_heads), ("num_kv_heads", arch.num_kv_heads),
                    ("intermediate_size", arch.intermediate_size)):
        if n % world:
            raise ValueError(f"{name}={n} does not split over {world} ranks")


def make_shard(arch: ModelArch, layer: int, rank: int, world: int, dtype: torch.dtype,
               device: str) -> LayerShard:
    """Rank `rank`'s share of layer `layer`'s weights. Every rank draws the same full weights
    (seeded by the layer), so the shards of all ranks make up one model."""
    g = torch.Generator(device).manual_seed(1000 + layer)
    d, hidden, inter = arch.head_dim, arch.hidden_size, arch.intermediate_size
    scale = hidden ** -0.5

    def full(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g, device=device, dtype=dtype) * scale

    def rows(w: torch.Tensor, parts: int) -> torch.Tensor:
        size = w.shape[0] // parts
        return w[rank * size:(rank + 1) * size].clone()

    def cols(w: torch.Tensor, parts: int) -> torch.Tensor:
        size = w.shape[1] // parts
        return w[:, rank * size:(rank + 1) * size].clone()

    return LayerShard(
        norm_in=torch.ones(hidden, device=device, dtype=dtype),
        wq=rows(full(arch.num_heads * d, hidden), world),
        wk=rows(full(arch.num_kv_heads * d, hidden), world),
        wv=rows(full(arch.num_kv_heads * d, hidden), world),
        wo=cols(full(hidden, arch.num_heads * d), world),
        norm_post=torch.ones(hidden, device=device, dtype=dtype),
        w_gate=rows(full(inter, hidden), world),
        w_up=rows(full(inter, hidden), world),
        w_down=cols(full(hidden, inter), world),
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def prefill_layer(x: torch.Tensor, w: LayerShard, arch: ModelArch, world: int) -> torch.Tensor:
    """x: [tokens, hidden], one sequence, causal."""
    d, t = arch.head_dim, x.shape[0]
    h = _rms_norm(x, w.norm_in, arch.rms_norm_eps)
    q = (h @ w.wq.T).view(t, -1, d).transpose(0, 1)
    k = (h @ w.wk.T).view(t, -1, d).transpose(0, 1)
    v = (h @ w.wv.T).view(t, -1, d).transpose(0, 1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + _all_reduce(attn.transpose(0, 1).reshape(t, -1) @ w.wo.T, world)
    h = _rms_norm(x, w.norm_post, arch.rms_norm_eps)
    mlp = (F.silu(h @ w.w_gate.T) * (h @ w.w_up.T)) @ w.w_down.T
    return x + _all_reduce(mlp, world)


def decode_layer(x: torch.Tensor, w: LayerShard, cache: tuple[torch.Tensor, torch.Tensor],
                 arch: ModelArch, world: int) -> torch.Tensor:
    """x: [batch, hidden], one new token per sequence; cache: K and V [batch, kv_heads_local,
    context + 1, head_dim], the new token's slot last."""
    d, b = arch.head_dim, x.shape[0]
    k_cache, v_cache = cache
    h = _rms_norm(x, w.norm_in, arch.rms_norm_eps)
    q = (h @ w.wq.T).view(b, -1, 1, d)
    k_cache[:, :, -1] = (h @ w.wk.T).view(b, -1, d)
    v_cache[:, :, -1] = (h @ w.wv.T).view(b, -1, d)
    attn = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
    x = x + _all_reduce(attn.reshape(b, -1) @ w.wo.T, world)
    h = _rms_norm(x, w.norm_post, arch.rms_norm_eps)
    mlp = (F.silu(h @ w.w_gate.T) * (h @ w.w_up.T)) @ w.w_down.T
    return x + _all_reduce(mlp, world)


def _time_ms(fn, repeats: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if not device.startswith("cuda"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if dist.is_initialized():
            dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graphed(fn, device: str):
    """`fn` captured in a CUDA graph (NCCL all-reduces included), as a serving engine runs its
    steps; returns the replay. On CPU, `fn` itself."""
    if not device.startswith("cuda"):
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(args: argparse.Namespace, rank: int, world: int, device: str) -> dict:
    arch = SYNTH_ARCHS[args.shape]
    check_divisible(arch, world)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shards = [make_shard(arch, i, rank, world, dtype, device) for i in range(args.layers)]
    kv_local, d = arch.num_kv_heads // world, arch.head_dim
    out = {"shape": args.shape, "tp": world, "layers": args.layers, "depth": arch.num_layers,
           "graphs": bool(args.graphs and device.startswith("cuda")),
           "context": args.context, "device": torch.cuda.get_device_name() if device.startswith(
               "cuda") else "cpu", "prefill_ms_per_layer": {}, "decode_ms_per_layer": {}}
    with torch.inference_mode():
        for tokens in args.tokens:
            x = torch.randn(tokens, arch.hidden_size, device=device, dtype=dtype)

            def prefill(x=x):
                y = x
                for w in shards:
                    y = prefill_layer(y, w, arch, world)

            step = _graphed(prefill, device) if args.graphs else prefill
            ms = _time_ms(step, args.repeats, args.warmup, device) / args.layers
            out["prefill_ms_per_layer"][str(tokens)] = ms
        for batch in args.batches:
            x = torch.randn(batch, arch.hidden_size, device=device, dtype=dtype)
            caches = [tuple(torch.randn(batch, kv_local, args.context + 1, d, device=device,
                                        dtype=dtype) for _ in range(2)) for _ in shards]

            def decode(x=x, caches=caches):
                y = x
                for w, cache in zip(shards, caches, strict=True):
                    y = decode_layer(y, w, cache, arch, world)

            step = _graphed(decode, device) if args.graphs else decode
            ms = _time_ms(step, args.repeats, args.warmup, device) / args.layers
            out["decode_ms_per_layer"][str(batch)] = ms
            del caches
    return out


def compare(paths: list[str]) -> None:
    loaded = {p: json.loads(Path(p).read_text()) for p in paths}
    results = sorted(loaded.values(), key=lambda r: r["tp"])
    base = results[0]
    if base["tp"] != 1:
        raise SystemExit("--compare needs a one-GPU run (tp 1) among its files")
    for path, r in loaded.items():
        if (r["shape"], r["context"]) != (base["shape"], base["context"]):
            raise SystemExit(f"{path}: {r['shape']} at context {r['context']}, not "
                             f"{base['shape']} at {base['context']} like the tp 1 run")
    depth = base["depth"]
    print(f"{base['shape']} on {base['device']}, context {base['context']}; ms at full depth "
          f"({depth} layers)")
    tokens = list(base["prefill_ms_per_layer"])
    batches = sorted(base["decode_ms_per_layer"], key=int)
    lo, hi = batches[0], batches[-1]
    print("| TP | " + " | ".join(f"prefill {t}" for t in tokens)
          + " | " + " | ".join(f"decode b{b}" for b in batches)
          + " | prefill eff/doubling | decode slope eff/doubling |")
    print("|" + "---|" * (3 + len(tokens) + len(batches)))

    def slope(r: dict) -> float:
        d = r["decode_ms_per_layer"]
        return (d[hi] - d[lo]) / (int(hi) - int(lo))

    for r in results:
        n = r["tp"]
        cells = [f"{r['prefill_ms_per_layer'][t] * depth:.1f}" for t in tokens]
        cells += [f"{r['decode_ms_per_layer'][b] * depth:.2f}" for b in batches]
        if n == 1:
            cells += ["-", "-"]
        else:
            k = math.log2(n)
            big = tokens[-1]
            e_pre = (base["prefill_ms_per_layer"][big]
                     / (n * r["prefill_ms_per_layer"][big])) ** (1 / k)
            e_dec = (slope(base) / (n * slope(r))) ** (1 / k) if slope(r) > 0 else float("nan")
            cells += [f"{e_pre:.2f} (at {big})", f"{e_dec:.2f} (b{lo}..b{hi})"]
        print(f"| {n} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-13b", choices=sorted(SYNTH_ARCHS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="run the layers eagerly instead of replaying CUDA graphs")
    ap.add_argument("--json", help="write rank 0's results here")
    ap.add_argument("--compare", nargs="+", metavar="JSON")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    result = run(args, rank, world, device)
    if rank == 0:
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
