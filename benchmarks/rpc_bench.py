"""Throughput of the worker RPC for streamed tokens, and what it costs the worker process.

    python benchmarks/rpc_bench.py
    python benchmarks/rpc_bench.py --streams 1,64,256 --chunks 200
    python benchmarks/rpc_bench.py --relay

A worker process serves `generate` from a stand-in engine loop that puts one output in every
request's stream at each "step", as an engine step does for its batch (no model: this
measures the RPC alone). The client, in this process, reads all streams at once, by
callbacks on its reader thread as the server's relay does (`--threads`: a thread per
stream; `--relay`: through the server's relay itself, on an event loop). Prints chunks per
second delivered and the worker's CPU time per chunk (in an engine's process that CPU is
taken from the engine's own Python), and with `--relay` the reading process's. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

from warmserve.engine.engine import RequestOutput
from warmserve.engine.loop import RequestStream
from warmserve.server.app import SSEChunks
from warmserve.server.relay import WorkerStream
from warmserve.worker.rpc import WorkerClient, WorkerServer

AUTHKEY = b"bench"


class SteppedWorker:
    """Each `generate` is a request stream that `step_to` feeds as the engine loop does: one
    output for every stream at each step, from one thread."""

    def __init__(self) -> None:
        self._streams: list[tuple[RequestStream, int]] = []
        self._lock = threading.Lock()

    def stats(self) -> dict:
        return {"cpu_s": sum(os.times()[:2])}

    def step_to(self, step: int) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream, chunks in streams:
            stream.put(RequestOutput(stream.request_id, [step], " tok", num_prompt_tokens=100,
                                     num_output_tokens=step + 1, finished=step == chunks - 1))
            if step == chunks - 1:
                stream.end()

    def generate(self, name, prompt, params, request_id=None) -> RequestStream:
        stream = RequestStream(request_id, 100, lambda request_id: None)
        with self._lock:
            self._streams.append((stream, prompt))
        return stream


def serve(address: str) -> None:
    worker = SteppedWorker()

    class Server(WorkerServer):  # step_to is this benchmark's own verb
        def _call(self, send, call_id, verb, kwargs):
            if verb == "stats" and "step" in kwargs:
                worker.step_to(kwargs["step"])
                send((call_id, "ok", None))
                return
            super()._call(send, call_id, verb, kwargs)

    Server(worker, address, AUTHKEY).serve_forever()


def run(address: str, streams: int, chunks: int, threads: bool = False) -> tuple[float, float]:
    """(chunks per second delivered, worker CPU µs per chunk). The client reads each stream
    through reader-thread callbacks (`WorkerClient.stream`, as the server's relay does), or
    with `threads` on a thread per stream iterating `WorkerClient.generate`."""
    client = WorkerClient(address, AUTHKEY, timeout_s=60)
    received = [0] * streams
    readers = []

    def read(k: int) -> None:
        for _ in client.generate("m", chunks, None, f"r{k}"):
            received[k] += 1

    def count(k: int, output, error) -> None:
        if output is not None:
            received[k] += 1

    for k in range(streams):
        if threads:
            readers.append(threading.Thread(target=read, args=(k,)))
            readers[-1].start()
        else:
            client.stream("m", chunks, None, f"r{k}", functools.partial(count, k))
    time.sleep(0.2)  # every stream waiting at step 0
    cpu0, start = client.stats()["cpu_s"], time.perf_counter()
    for step in range(chunks):
        client.call("stats", step=step)
        while sum(received) < (step + 1) * streams:  # the step's chunks all delivered
            time.sleep(0.0002)
    elapsed = time.perf_counter() - start
    cpu = client.stats()["cpu_s"] - cpu0
    for t in readers:
        t.join(10)
    client.close()
    total = streams * chunks
    return total / elapsed, cpu / total * 1e6


def run_relay(address: str, streams: int, chunks: int) -> tuple[float, float, float]:
    """(chunks per second delivered, worker CPU µs per chunk, this process's CPU µs per
    chunk). Each stream is read as the API server reads it: a `WorkerStream` awaited on an
    event loop, each output formatted as the server-sent event the HTTP client gets (the
    HTTP layer itself is not in it)."""
    client = WorkerClient(address, AUTHKEY, timeout_s=60)
    received = [0]
    step_done = threading.Event()
    target = [streams]

    async def consume(k: int) -> None:
        stream = WorkerStream(client, "m", chunks, None, f"r{k}")
        sse = SSEChunks("m", "chat.completion", f"r{k}", 0)
        with contextlib.suppress(StopAsyncIteration):
            while True:
                output = await stream.next()
                sse.format(output)
                received[0] += 1
                if received[0] >= target[0]:
                    step_done.set()

    def drive() -> tuple[float, float, float]:
        time.sleep(0.2)  # every stream waiting at step 0
        cpu0, own0, start = client.stats()["cpu_s"], time.process_time(), time.perf_counter()
        for step in range(chunks):
            target[0] = (step + 1) * streams
            step_done.clear()
            client.call("stats", step=step)
            if not step_done.wait(60):
                raise RuntimeError(f"step {step}: {received[0]} of {target[0]} chunks read")
        elapsed, own = time.perf_counter() - start, time.process_time() - own0
        total = streams * chunks
        return (total / elapsed, (client.stats()["cpu_s"] - cpu0) / total * 1e6,
                own / total * 1e6)

    async def main() -> tuple[float, float, float]:
        tasks = [asyncio.create_task(consume(k)) for k in range(streams)]
        result = await asyncio.to_thread(drive)
        await asyncio.gather(*tasks)
        return result

    try:
        return asyncio.run(main())
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,64,256")
    ap.add_argument("--chunks", type=int, default=100, help="Steps, one chunk per stream each.")
    ap.add_argument("--threads", action="store_true",
                    help="Read each stream on its own thread (the server's way until 2026-12-05).")
    ap.add_argument("--relay", action="store_true",
                    help="Read each stream as the API server does (its relay on an event "
                         "loop, each output formatted as a server-sent event) and print this "
                         "process's CPU per chunk too.")
    args = ap.parse_args()
    how = ("through the server's relay" if args.relay else
           "on a thread per stream" if args.threads else "by callbacks")
    print(f"client reading {how}")
    extra = " server CPU per chunk |" if args.relay else ""
    print("| streams | chunks per s | worker CPU per chunk | a step's chunks delivered in |"
          + extra)
    print("|---|---|---|---|" + ("---|" if args.relay else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.streams.split(",")):
            address = str(Path(tmp) / f"w{n}.sock")
            worker = mp.get_context("fork").Process(target=serve, args=(address,), daemon=True)
            worker.start()
            while not Path(address).exists():
                time.sleep(0.01)
            if args.relay:
                rate, cpu_us, own_us = run_relay(address, n, args.chunks)
            else:
                (rate, cpu_us), own_us = run(address, n, args.chunks, args.threads), None
            worker.kill()
            print(f"| {n} | {rate:,.0f} | {cpu_us:.1f} µs | {n / rate * 1e3:.2f} ms |"
                  + (f" {own_us:.1f} µs |" if own_us is not None else ""))


if __name__ == "__main__":
    main()
