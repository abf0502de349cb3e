"""What the API server's process spends on each streamed token, end to end over real HTTP.

    python benchmarks/server_bench.py --tiny
    python benchmarks/server_bench.py --config h100-live --streams 192 --tokens 256

Starts `warmserve serve` (its default config: SmolLM2 on two CPU workers; `--tiny`: two
2-layer random-weight models on two CPU workers, whose steps take milliseconds, so that the
server, not the engine, is what is loaded on a machine without a GPU), streams
`--streams` chat completions at once through it (`ignore_eos`, `--tokens` each, split over
the configured models), and reads the server process's own CPU time (`/proc`, not its
workers') around them. Prints the chunks delivered per second and the server's CPU per
chunk, less what it spends idle over as long (its controller's ticks). Every token of every
model passes through this one process, so its CPU per chunk bounds the tokens a cluster can
stream: at 50 µs a chunk, 20,000 a second. Linux only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """The process's user and system time (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


TINY = """\
cluster:
  nodes:
    - name: local
      host_memory_gib: 4
      pinned_cache_gib: 1
      devices: [{type: cpu, count: 2, memory_gib: 1}]
models:
  - {name: tiny-a, checkpoint: "synth:tiny", dtype: float32, max_context: 512}
  - {name: tiny-b, checkpoint: "synth:tiny", dtype: float32, max_context: 512}
engine: {kv_cache_gib: 0.05, max_num_seqs: 128}
policy: {page_size_mib: 2, instance_capacity: 128}
server: {max_queued_per_model: 1024}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: subprocess.Popen, url: str, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited ({server.returncode}) before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    sys.exit(f"the server was not healthy after {seconds:.0f} s")


async def stream_all(url: str, models: list[str], streams: int, tokens: int) -> int:
    """Chunks received over all streams."""
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int) -> int:
            body = {"model": models[i % len(models)], "max_tokens": tokens, "stream": True,
                    "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to {i + 10}."}]}
            chunks = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
            return chunks

        return sum(await asyncio.gather(*(one(i) for i in range(streams))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a config name or file (default: serve's)")
    ap.add_argument("--tiny", action="store_true", help="serve two tiny random-weight models")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--start-timeout", type=float, default=600)
    args = ap.parse_args()

    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        args.config = str(Path(tmp.name) / "tiny.yaml")
        Path(args.config).write_text(TINY)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "warmserve.cli", "serve", "--port", str(port), "--log-level",
           "warning"] + (["--config", args.config] if args.config else [])
    server = subprocess.Popen(cmd, start_new_session=True)
    try:
        models = wait_healthy(server, url, args.start_timeout)
        asyncio.run(stream_all(url, models, len(models), 4))  # every model active and warm
        before, t0 = cpu_s(server.pid), time.perf_counter()
        time.sleep(3.0)
        idle_per_s = (cpu_s(server.pid) - before) / (time.perf_counter() - t0)
        print(f"server idle: {idle_per_s * 1e3:.1f} ms of CPU a second")
        print("| streams | tokens each | chunks | wall (s) | chunks/s "
              "| server CPU per chunk (µs) |")
        print("|---|---|---|---|---|---|")
        for _ in range(args.rounds):
            before, t0 = cpu_s(server.pid), time.perf_counter()
            chunks = asyncio.run(stream_all(url, models, args.streams, args.tokens))
            wall = time.perf_counter() - t0
            busy = cpu_s(server.pid) - before - idle_per_s * wall
            print(f"| {args.streams} | {args.tokens} | {chunks} | {wall:.2f} | "
                  f"{chunks / wall:,.0f} | {busy / chunks * 1e6:.1f} |")
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """Interrupt the server's process group (it drains, then closes its workers); kill it if
    that takes over a minute. A group already gone (the server died first) is no error."""
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
