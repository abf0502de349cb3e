"""The RPC layer on its own, over a real Unix socket, with a stand-in for the worker."""

from __future__ import annotations

import pickle
import queue
import threading
import time

import pytest

from warmserve.engine.engine import RequestOutput
from warmserve.engine.loop import RequestStream
from warmserve.worker.rpc import WorkerClient, WorkerGone, WorkerServer, _Outbox
from warmserve.worker.worker import Refused

AUTHKEY = b"test"


class FakeWorker:
    """Each `generate` is a real RequestStream fed by its own thread, as the engine loop
    feeds it: `chunks` outputs (`prompt` stands for their number), the first at once and the
    rest once `gate` is set (if given)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.aborted: list[str] = []

    def generate(self, name, prompt, params, request_id=None):
        if prompt < 0:
            raise Refused(f"model {name!r} is not active")
        stream = RequestStream(request_id, 0, self.aborted.append)
        threading.Thread(target=self._feed, args=(stream, prompt), daemon=True).start()
        return stream

    def _feed(self, stream: RequestStream, chunks: int) -> None:
        for i in range(chunks):
            if self.gate is not None and i:
                self.gate.wait(5)
            stream.put(RequestOutput(stream.request_id, [i], f"t{i}",
                                     finished=i == chunks - 1))
        stream.end()

    def stats(self):
        return {"ok": True}


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(worker) -> WorkerClient:
        server = WorkerServer(worker, str(tmp_path / f"w{len(servers)}.sock"), AUTHKEY)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return WorkerClient(server.address, AUTHKEY, timeout_s=10)

    yield start
    for server in servers:
        server.close()


def test_concurrent_streams_arrive_whole_and_in_order(serve):
    client = serve(FakeWorker())
    results: dict[str, list[int]] = {}

    def run(i: int) -> None:
        results[f"r{i}"] = [o.token_ids[0] for o in client.generate("m", 50 + i, None, f"r{i}")]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {f"r{i}": list(range(50 + i)) for i in range(16)}
    assert client.stats() == {"ok": True}


def test_a_callback_stream_gets_its_chunks_then_the_end_or_one_error(serve):
    client = serve(FakeWorker())
    replies: queue.SimpleQueue = queue.SimpleQueue()
    client.stream("m", 3, None, "r0", lambda output, error: replies.put((output, error)))
    got = [replies.get(timeout=5) for _ in range(4)]
    assert [o.token_ids for o, _ in got[:3]] == [[0], [1], [2]] and got[3] == (None, None)
    client.stream("m", -1, None, "r1", lambda output, error: replies.put((output, error)))
    output, error = replies.get(timeout=5)
    assert output is None and isinstance(error, Refused) and "not active" in str(error)


def _serve_fake_worker(address: str) -> None:
    WorkerServer(FakeWorker(threading.Event()), address, AUTHKEY).serve_forever()


def test_a_callback_stream_learns_that_the_worker_died(tmp_path):
    import multiprocessing as mp

    address = str(tmp_path / "w.sock")
    worker = mp.get_context("spawn").Process(target=_serve_fake_worker, args=(address,),
                                            daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "w.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    client = WorkerClient(address, AUTHKEY, timeout_s=10)
    replies: queue.SimpleQueue = queue.SimpleQueue()
    client.stream("m", 100, None, "r0", lambda output, error: replies.put((output, error)))
    assert replies.get(timeout=5)[0].token_ids == [0]  # the rest wait on a gate never set
    worker.kill()
    output, error = replies.get(timeout=5)
    assert output is None and isinstance(error, WorkerGone)


class SlowConn:
    """A connection whose first send waits until released, recording each message sent."""

    def __init__(self) -> None:
        self.sent: list[list] = []
        self.release = threading.Event()
        self.first = threading.Event()

    def send(self, message: list) -> None:
        if not self.sent:
            self.first.set()
            self.release.wait(5)
        self.sent.append(message)


def test_what_queues_during_a_send_goes_in_one_message():
    conn = SlowConn()
    outbox = _Outbox(conn)
    outbox.put((0, "chunk", "a"))
    assert conn.first.wait(5)  # the first message is on its way, alone
    for i in range(1, 6):
        outbox.put((i, "chunk", "b"))
    conn.release.set()
    outbox.close()
    deadline = time.monotonic() + 5
    while len(conn.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.sent == [[(0, "chunk", "a")], [(i, "chunk", "b") for i in range(1, 6)]]
    with pytest.raises(OSError, match="closed"):
        outbox.put((9, "chunk", "c"))


class PicklingConn(SlowConn):
    def send(self, message: list) -> None:
        pickle.dumps(message)  # as Connection.send does before it writes
        super().send(message)


def test_a_reply_that_does_not_pickle_fails_its_call_alone():
    conn = PicklingConn()
    outbox = _Outbox(conn)
    outbox.put((0, "ok", "first"))
    assert conn.first.wait(5)
    outbox.put((1, "ok", lambda: None))  # not picklable
    outbox.put((2, "ok", "third"))
    conn.release.set()
    outbox.close()
    deadline = time.monotonic() + 5
    while len(conn.sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.sent[0] == [(0, "ok", "first")] and conn.sent[2] == [(2, "ok", "third")]
    [(call_id, kind, (error_kind, message))] = conn.sent[1]
    assert (call_id, kind, error_kind) == (1, "error", "RemoteError")
    assert "cannot be sent" in message


def test_a_client_that_goes_away_aborts_its_generation(serve):
    gate = threading.Event()
    worker = FakeWorker(gate)
    client = serve(worker)
    first = next(client.generate("m", 1000, None, "r0"))
    assert first.token_ids == [0]
    client.close()
    gate.set()  # the stream goes on; its next chunk finds the client gone
    deadline = time.monotonic() + 5
    while not worker.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.aborted == ["r0"]


def test_rpc_bench_delivers_every_chunk(tmp_path):
    import multiprocessing as mp

    from benchmarks.rpc_bench import run, run_relay, serve

    address = str(tmp_path / "bench.sock")
    worker = mp.get_context("spawn").Process(target=serve, args=(address,), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "bench.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for threads in (False, True):
            rate, cpu_us = run(address, streams=4, chunks=5, threads=threads)
            assert rate > 0 and cpu_us >= 0
        rate, cpu_us, own_us = run_relay(address, streams=4, chunks=5)  # every chunk read
        assert rate > 0 and cpu_us >= 0 and own_us >= 0
    finally:
        worker.kill()
