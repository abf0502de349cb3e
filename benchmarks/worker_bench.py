"""A universal worker on one GPU: how long a prewarmed model takes to serve its first token.

    PYTHONPATH=src python benchmarks/worker_bench.py [--config h100-live] [--cache-dir DIR]

Builds the worker the way its process does (CUDA VMM pool, pinned host cache), prewarms every
configured model (their runners — CUDA graphs included — are built while they are only
prewarmed), then for each model: activate and time a 512-token prompt to its first token
(the rest of the KV cache still mapping behind it), against the same prompt once everything is
mapped and warm. A second round activates them again after a
deactivation. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from warmserve.config import load_config
from warmserve.engine.sampling import SamplingParams
from warmserve.memory.backends import CudaVmmBackend
from warmserve.memory.pool import PagePool
from warmserve.worker.worker import UniversalWorker


def first_token_s(worker: UniversalWorker, name: str, tag: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for _ in worker.generate(name, list(range(100, 612)), params, request_id=tag):
        break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="h100-live")
    ap.add_argument("--cache-dir", default="/tmp/warmserve-bench")
    args = ap.parse_args()
    config = load_config(args.config)
    node = config.cluster.nodes[0]
    page = config.policy.page_size_mib << 20
    backend = CudaVmmBackend(0, page)
    free, _ = torch.cuda.mem_get_info(0)
    pool = PagePool(backend, int(free * config.policy.pool_memory_fraction) // page,
                    config.policy.max_slots_per_device)
    worker = UniversalWorker(pool, config.models, config.engine, Path(args.cache_dir),
                             host_cache_bytes=int(node.pinned_cache_gib * (1 << 30)))
    names = [m.name for m in config.models]
    rows: list[tuple[str, str, float]] = []
    for name in names:
        worker.prewarm(name, wait=True)  # the first one also fills the host cache from disk
        start = time.perf_counter()
        worker.evict(name)
        worker.prewarm(name, wait=True)  # from the host cache: copy, map, build the runner
        rows.append((name, "prewarm from host cache (incl. runner)", time.perf_counter() - start))
    for round_name in ("first activation", "activation after a deactivation"):
        for name in names:
            start = time.perf_counter()
            worker.activate(name)
            activate_s = time.perf_counter() - start
            first = first_token_s(worker, name, f"{round_name}-{name}")
            pending = worker._residents[name].kv_pending
            if pending is not None:
                pending.result()  # the rest of the KV cache is mapped
            warm = statistics.median(first_token_s(worker, name, f"w{i}-{name}")
                                     for i in range(5))
            rows.append((name, f"{round_name}: activate call", activate_s))
            rows.append((name, f"{round_name}: first token (512-token prompt)",
                         activate_s + first))
            rows.append((name, f"{round_name}: the same prompt, warm", warm))
            worker.deactivate(name)
    print(f"\n{torch.cuda.get_device_name(0)}, config {args.config}")
    print(f"{'model':16s} {'measurement':58s} value")
    for name, what, value in rows:
        print(f"{name:16s} {what:58s} {value * 1000:8.1f} ms")
    worker.close()


if __name__ == "__main__":
    main()
