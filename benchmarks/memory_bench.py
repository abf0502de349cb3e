"""Memory switching on one GPU: VMM costs by chunk size, cold load into a slot, activation,
eviction during activation, and KV lending while decoding. Measures; asserts nothing.

    python benchmarks/memory_bench.py --shape llama-3-8b --out memory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from warmserve.config import EngineConfig
from warmserve.engine.checkpoint import read_arch, write_synthetic
from warmserve.engine.engine import create_engine
from warmserve.engine.sampling import SamplingParams
from warmserve.memory.backends import CudaVmmBackend
from warmserve.memory.host_cache import HostWeightCache
from warmserve.memory.layout import LayoutProvider, plan_layout
from warmserve.memory.pool import PagePool
from warmserve.memory.prewarm import prewarm_slot

GiB = 1 << 30


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def vmm_costs(total: int) -> dict:
    """create / map / set-access / unmap / release of `total` bytes in chunks of each size."""
    out = {}
    for chunk in (2 << 20, 32 << 20, 256 << 20):
        b = CudaVmmBackend(0, chunk)
        n = total // chunk
        t0 = time.perf_counter()
        handles = b.create_pages(n)
        t1 = time.perf_counter()
        va = b.reserve(total)
        for i, h in enumerate(handles):
            b.map(va + i * chunk, h)
        t2 = time.perf_counter()
        for i in range(n):
            b.set_access(va + i * chunk, chunk)
        t3 = time.perf_counter()
        b.set_access(va, total)  # one call over the whole range (what the pool does per run)
        t4 = time.perf_counter()
        b.unmap(va, total)
        t5 = time.perf_counter()
        b.release_pages(handles)
        t6 = time.perf_counter()
        b.free_range(va, total)
        out[f"{chunk >> 20}MiB"] = {"create_ms": (t1 - t0) * 1e3, "map_ms": (t2 - t1) * 1e3,
                                    "set_access_per_chunk_ms": (t3 - t2) * 1e3,
                                    "set_access_one_call_ms": (t4 - t3) * 1e3,
                                    "unmap_ms": (t5 - t4) * 1e3, "release_ms": (t6 - t5) * 1e3}
    return out


def first_token_s(engine, prompt_len: int, tag: str) -> float:
    engine.add_request(tag, list(range(1000, 1000 + prompt_len)),
                       SamplingParams(max_tokens=1, temperature=0))
    start = now()
    while engine.has_work():
        engine.step()
    return now() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--kv-gib", type=float, default=16.0)
    ap.add_argument("--cache-dir", default="/tmp/warmserve-bench")
    ap.add_argument("--page-mib", type=int, default=32, help="Pool page size.")
    ap.add_argument("--skip-vmm", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    page = args.page_mib << 20
    chunk = max(1, (256 << 20) // page)  # prewarm copy chunks of 256 MiB
    r: dict = {"device": torch.cuda.get_device_name()}

    r["page_mib"] = args.page_mib
    r["vmm_8GiB"] = {} if args.skip_vmm else vmm_costs(8 * GiB)

    path = Path(args.cache_dir) / "synth" / args.shape
    if not (path / "config.json").exists():
        write_synthetic(args.shape, path, device="cuda")
    arch = read_arch(path)
    layout = plan_layout(arch, torch.bfloat16, page, 16, int(args.kv_gib * GiB))
    t0 = time.perf_counter()
    host = HostWeightCache(64 * GiB).load(args.shape, path, arch, layout)
    r["host_cache_fill_s"] = time.perf_counter() - t0
    r["weights_gb"] = layout.weight_bytes / 1e9

    dst = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    dst[: 1 << 30].copy_(host[: 1 << 30])  # warm-up
    start = now()
    dst.copy_(host, non_blocking=True)
    r["pinned_copy_s"] = now() - start
    r["pinned_copy_gbps"] = host.numel() / r["pinned_copy_s"] / 1e9
    del dst
    torch.cuda.empty_cache()

    free, _ = torch.cuda.mem_get_info()
    pool = PagePool(CudaVmmBackend(0, page), int(free * 0.85) // page)
    r["pool_pages"] = pool.num_pages

    # Cold load from the pinned host cache into a slot, pipelined with mapping (3 runs).
    loads = []
    for run in range(3):
        slot = pool.create_slot(f"a{run}", layout.capacity_bytes)
        start = now()
        prewarm_slot(pool, slot, host, chunk_pages=chunk)
        loads.append(now() - start)
        if run < 2:
            pool.drop_slot(slot.name).result()
    r["cold_load_runs_s"] = loads
    r["cold_load_s"] = statistics.median(loads)
    # Diagnostics: map only; one copy into mapped pages; map everything first, then copy.
    diag = pool.create_slot("diag", layout.weight_pages * page)
    start = now()
    pool.map(diag, range(layout.weight_pages)).result()
    r["map_weight_pages_s"] = now() - start
    start = now()
    pool.view(diag)[: host.numel()].copy_(host, non_blocking=True)
    r["copy_into_mapped_slot_s"] = now() - start
    pool.drop_slot("diag").result()
    diag = pool.create_slot("diag", layout.weight_pages * page)
    start = now()
    prewarm_slot(pool, diag, host, chunk_pages=chunk, pipeline=False)
    r["cold_load_map_first_s"] = now() - start
    pool.drop_slot("diag").result()
    r["cold_load_gbps"] = host.numel() / r["cold_load_s"] / 1e9
    r["cold_load_vs_pinned_copy"] = r["cold_load_gbps"] / r["pinned_copy_gbps"]

    # Activation: map the KV cache beside the weights (the first GiB now, the rest behind it),
    # build the engine over the slot (no copy), serve a 512-token prompt — optionally while
    # another prewarmed model on the GPU is evicted. The first cycle in a fresh process also
    # compiles kernels; a worker pays that once, so cycles 2 and 3 are the steady state.
    config = EngineConfig(use_cuda_graphs=False, max_num_seqs=64, max_tokens_per_step=4096)
    # A model's first activation in a worker also captures its decode CUDA graphs (the worker
    # keeps them across deactivations, so only the first activation pays).
    graph_config = EngineConfig(max_num_seqs=64, max_tokens_per_step=4096)
    kv_pages = list(layout.kv_pages(0, layout.num_blocks))
    first = max(1, (256 << 20) // page)  # blocks for the first requests; the rest follows
    scratch = list(layout.kv_pages(layout.num_blocks - 1, 1))

    # The worker builds the model over the slot when a prewarm finishes (views, no copies).
    from warmserve.engine.loader import build_model
    from warmserve.engine.tokenizer import Tokenizer

    prebuilt = build_model(arch, path, torch.bfloat16,
                           LayoutProvider(pool.view(slot), layout, filled=True))
    tokenizer = Tokenizer(path, arch)

    def activate(evict: str | None, graphs: bool = False) -> tuple[dict, object]:
        if evict:
            prewarm_slot(pool, pool.create_slot(evict, layout.weight_pages * page), host, chunk)
        start = now()
        eviction = pool.drop_slot(evict) if evict else None
        # the first blocks, and the last one: CUDA-graph padding rows write there (as the worker)
        now_pages = sorted(set(kv_pages[:first]) | set(scratch))
        pool.map(slot, now_pages).result()
        rest = pool.map(slot, [p for p in kv_pages[first:] if p not in set(now_pages)])
        t_map = now()
        engine = create_engine(path, graph_config if graphs else config, "bfloat16", "cuda",
                               4096,
                               provider=LayoutProvider(pool.view(slot), layout, filled=True),
                               kv_cache_bytes=layout.kv_bytes, model=prebuilt,
                               tokenizer=tokenizer)
        bm = engine.block_manager
        staged = bm.lend(bm.num_free_blocks - first * page // layout.block_bytes)
        t_build = now()
        prefill = first_token_s(engine, 512, "act")
        t_first = now()
        rest.result()
        bm.reclaim(staged)
        t_all = now()
        if eviction:
            eviction.result()
        return {"map_first_256mib_s": t_map - start, "build_s": t_build - t_map,
                "prefill_s": prefill, "first_token_s": t_first - start,
                "all_kv_mapped_s": t_all - start}, engine

    def deactivate(engine) -> None:
        del engine
        pool.unmap(slot, kv_pages).result()  # weights stay: the model is prewarmed again

    cycles: dict[str, list] = {}
    plan = [("first_in_process_with_eviction", "b0", False)] + [
        (kind, f"b{i}" if kind.endswith("with_eviction") else None, False)
        for i in range(1, 4) for kind in ("warm_no_eviction", "warm_with_eviction")] + [
        ("first_in_worker_with_graph_capture", None, True)]
    for index, (name, evict, graphs) in enumerate(plan):
        timing, engine = activate(evict, graphs)
        cycles.setdefault(name, []).append(timing)
        if index < len(plan) - 1:
            deactivate(engine)
    r["activation"] = {name: {key: statistics.median(t[key] for t in runs) for key in runs[0]}
                       for name, runs in cycles.items()}
    cycles = r["activation"]
    r["kv_gib"] = layout.kv_bytes / GiB
    r["prefill_512_warm_s"] = statistics.median(first_token_s(engine, 512, f"w{i}")
                                                for i in range(5))
    for name, cycle in cycles.items():
        r[f"activation_overhead_{name}_s"] = cycle["first_token_s"] - r["prefill_512_warm_s"]
    del engine

    # Lending and reclaiming 10 GB of KV pages while decoding (CUDA graphs on).
    engine = create_engine(path, EngineConfig(max_num_seqs=64, max_cuda_graph_batch=16),
                           "bfloat16", "cuda", 4096,
                           provider=LayoutProvider(pool.view(slot), layout, filled=True),
                           kv_cache_bytes=layout.kv_bytes)
    for i in range(8):
        engine.add_request(f"d{i}", list(range(2000 + i, 2200 + i)),
                           SamplingParams(max_tokens=3800, temperature=0, ignore_eos=True))
    for _ in range(10):
        engine.step()

    def steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = now()
            engine.step()
            times.append(now() - t)
        return times

    base = statistics.median(steps(60))
    bm = engine.block_manager
    lend_blocks = (10 * 10**9 // layout.block_bytes) // layout.blocks_per_unit * (
        layout.blocks_per_unit)
    lent = bm.lend(lend_blocks)
    pages = list(layout.kv_pages(min(lent), len(lent)))
    done = threading.Event()

    def churn() -> None:  # lend and reclaim the 10 GB over and over for at least a second
        cycles, t = 0, time.perf_counter()
        while cycles < 3 or time.perf_counter() - t < 1.0:
            pool.unmap(slot, pages).result()
            pool.map(slot, pages).result()
            cycles += 1
        r["lend_reclaim_10gb_s"] = (time.perf_counter() - t) / cycles
        r["lend_reclaim_cycles"] = cycles
        done.set()

    thread = threading.Thread(target=churn)
    thread.start()
    during = []
    while not done.is_set():
        during += steps(1)
    thread.join()
    bm.reclaim(lent)
    r |= {"tpot_b8_s": base, "tpot_b8_during_lending_s": statistics.median(during),
          "tpot_change": statistics.median(during) / base - 1, "steps_during": len(during)}
    pool.check()

    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    print(json.dumps({"vmm_8GiB": r["vmm_8GiB"], "activation": r["activation"]}, indent=1))
    print(f"\n{'metric':48s} value")
    for key, value in r.items():
        if key in ("vmm_8GiB", "activation"):
            continue
        if isinstance(value, list):
            value = "  ".join(f"{v * 1e3:.1f} ms" for v in value)
        shown = f"{value * 1e3:.1f} ms" if key.endswith("_s") and not isinstance(value, str) else (
            f"{value:.3f}" if isinstance(value, float) else value)
        print(f"{key:48s} {shown}")


if __name__ == "__main__":
    main()
