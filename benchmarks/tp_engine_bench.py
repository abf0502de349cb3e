"""The engine split over several GPUs (tensor parallelism, one process per GPU) against one GPU.

    python benchmarks/tp_engine_bench.py --shape llama-2-13b --tp 1,2 --batches 1,32
    python benchmarks/tp_engine_bench.py --shape llama-2-7b --tp 1,2,4 --kv-gib 8

For each degree in `--tp` it starts that many processes, one per GPU (0, 1, ...), builds the
engine's shards of a synthetic checkpoint of `--shape` (random weights of the real shape),
and has the driver time TTFT of 512- and 2,048-token prompts and a decode step at each batch
(benchmarks/engine_bench.py's measures), the other ranks following its steps. Prints a table
last; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_bench import tpot, ttft
from warmserve.config import EngineConfig
from warmserve.engine.checkpoint import write_synthetic
from warmserve.engine.engine import create_engine, create_runner
from warmserve.engine.parallel import Shard, TensorParallel, follow

PROMPTS = (512, 2048)


def _rank(rank: int, size: int, port: int, checkpoint: str, config: EngineConfig,
          batches: list[int], out: str) -> None:
    torch.cuda.set_device(rank)
    tp = None
    if size > 1:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        tp = TensorParallel.join(store, f"tp{size}", Shard(rank, size),
                                 torch.device("cuda", rank))
    start = time.perf_counter()
    args = (Path(checkpoint), config, "bfloat16", "cuda")
    if tp is not None and not tp.is_driver:
        follow(create_runner(*args, max_context=4096, tp=tp), tp)
        tp.close()
        return
    engine = create_engine(*args, max_context=4096, tp=tp)
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    result = {"load_s": time.perf_counter() - start, "weight_gib_per_gpu": weights / 2**30}
    for n in PROMPTS:
        result[f"ttft_{n}_ms"] = ttft(engine, n, "cuda", reps=5) * 1e3
    for batch in batches:
        result[f"tpot_b{batch}_ms"] = tpot(engine, batch, "cuda", 64) * 1e3
    engine.runner.close()
    Path(out).write_text(json.dumps(result))
    if tp is not None:
        tp.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-2-13b")
    ap.add_argument("--tp", default="1,2", help="degrees to time, comma-separated")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="KV cache per GPU")
    ap.add_argument("--cache-dir", default="/tmp/warmserve-bench")
    args = ap.parse_args()

    path = Path(args.cache_dir) / "synth" / args.shape
    if not (path / "config.json").exists():
        write_synthetic(args.shape, path, dtype="bfloat16", device="cuda")
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(max_num_seqs=max(64, *batches), max_tokens_per_step=4096,
                          kv_cache_gib=args.kv_gib, max_cuda_graph_batch=max(64, *batches))
    rows = {}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for size in (int(t) for t in args.tp.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "result.json")
            mp.start_processes(_rank, args=(size, store.port, str(path), config, batches, out),
                               nprocs=size, start_method="spawn")
            rows[size] = json.loads(Path(out).read_text())
        print(f"TP{size}: {rows[size]}", flush=True)

    columns = ["load_s", "weight_gib_per_gpu", *(f"ttft_{n}_ms" for n in PROMPTS),
               *(f"tpot_b{b}_ms" for b in batches)]
    print(f"\n{args.shape}, {torch.cuda.get_device_name()}")
    print("| TP | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for size, row in rows.items():
        print(f"| {size} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
