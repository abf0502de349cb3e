"""Entry point of one worker process: `python -m warmserve.worker ...` (see cluster/local.py).

The RPC key arrives on standard input, never on the command line, and standard input then
stays open: its end means the process that started the worker is gone, and the worker exits.
"READY" on standard output means the socket accepts calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from warmserve.config import load_config
from warmserve.logs import setup_logging
from warmserve.memory.backends import CudaVmmBackend, HostBackend
from warmserve.memory.pool import PagePool
from warmserve.worker.rpc import WorkerServer
from warmserve.worker.worker import UniversalWorker


class _CacheProgressBar:
    """A progress bar on standard error while the host cache reads a model from disk."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(stderr=True)  # not a terminal (a log file, a journal): no bar,
        # which would leave a blank line there
        self._progress = Progress(console=console, transient=True,
                                  disable=not console.is_terminal)
        self._tasks: dict[str, int] = {}

    def __call__(self, key: str, done: int, total: int) -> None:
        if key not in self._tasks:
            self._progress.start()
            self._tasks[key] = self._progress.add_task(f"caching {key}", total=total)
        self._progress.update(self._tasks[key], completed=done)
        if done >= total:
            self._progress.remove_task(self._tasks.pop(key))
            if not self._tasks:
                self._progress.stop()


def _exit_with_parent() -> None:
    """Standard input stays open while the process that started this worker lives (see
    cluster/local.py): at its end, however it ended, the worker ends too, and the device
    memory it holds is freed."""
    sys.stdin.read()
    logging.getLogger("warmserve.worker").warning("the process that started this worker is "
                                                  "gone; exiting")
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m warmserve.worker")
    ap.add_argument("--config", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--device-index", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    # A Ctrl-C at the terminal reaches the whole foreground process group: the process that
    # started this worker decides when it stops (it closes the worker, or its end does)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(args.log_level)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    threading.Thread(target=_exit_with_parent, daemon=True, name="parent-watch").start()
    config = load_config(args.config)
    node = next(n for n in config.cluster.nodes if n.name == args.node)
    devices = [g for g in node.devices for _ in range(g.count)]
    group = devices[args.device_index]
    page = config.policy.page_size_mib << 20
    if group.type == "cuda":
        cuda_index = sum(1 for g in devices[: args.device_index] if g.type == "cuda")
        backend = CudaVmmBackend(cuda_index, page)
        free, _ = torch.cuda.mem_get_info(cuda_index)
        pool_bytes = free * config.policy.pool_memory_fraction
    else:
        backend = HostBackend(page)
        pool_bytes = group.memory_gib * (1 << 30) * config.policy.pool_memory_fraction
    pool = PagePool(backend, max(1, int(pool_bytes) // page), config.policy.max_slots_per_device)
    worker = UniversalWorker(pool, config.models, config.engine, Path(args.cache_dir),
                             host_cache_bytes=int(node.pinned_cache_gib * (1 << 30)
                                                  / len(devices)),
                             on_cache_progress=_CacheProgressBar())
    server = WorkerServer(worker, args.socket, authkey)
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
