"""WorkerStream: a generation's replies, handed from a worker client's reader thread to the
server's event loop in batches, as the relay's consumer reads them."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from warmserve.engine.engine import RequestOutput
from warmserve.engine.sampling import InvalidRequestError
from warmserve.engine.sequence import FinishReason
from warmserve.server.errors import APIError
from warmserve.server.relay import Relay, WorkerStream
from warmserve.worker.rpc import RemoteError, WorkerGone


class ReaderClient:
    """The part of WorkerClient a WorkerStream uses: `stream` registers a reply callback,
    which the test calls from its own thread, as the client's reader thread does."""

    def __init__(self, timeout_s: float = 30.0, gone: bool = False) -> None:
        self.timeout_s = timeout_s
        self.gone = gone
        self.callbacks: dict[str, object] = {}

    def stream(self, model, prompt, params, request_id, on_reply) -> None:
        if self.gone:
            raise WorkerGone("worker at test is gone")
        self.callbacks[request_id] = on_reply


def output(request_id: str, i: int, last: bool = False) -> RequestOutput:
    return RequestOutput(request_id, [i], f"<{i}>", num_output_tokens=i + 1, finished=last)


async def read_error(stream: WorkerStream) -> APIError:
    """The API error the stream's next read raises."""
    with pytest.raises(APIError) as failed:
        await stream.next()
    return failed.value


async def read_all(stream: WorkerStream) -> list[str]:
    texts = []
    while True:
        try:
            texts.append((await stream.next()).text)
        except StopAsyncIteration:
            return texts


def test_replies_from_a_reader_thread_arrive_whole_and_in_order() -> None:
    streams, chunks = 40, 25

    async def main() -> list[list[str]]:
        client = ReaderClient()
        readers = [WorkerStream(client, "m", "p", None, f"r{k}") for k in range(streams)]
        consumers = [asyncio.create_task(read_all(s)) for s in readers]

        def reader_thread() -> None:  # a step's replies for every stream, step after step
            for i in range(chunks):
                for k in range(streams):
                    client.callbacks[f"r{k}"](output(f"r{k}", i, i == chunks - 1), None)
                if i % 5 == 0:
                    time.sleep(0.001)  # some steps find the consumers waiting
            for k in range(streams):
                client.callbacks[f"r{k}"](None, None)  # the end of each stream

        thread = threading.Thread(target=reader_thread)
        thread.start()
        texts = await asyncio.gather(*consumers)
        thread.join()
        return texts

    for texts in asyncio.run(main()):
        assert texts == [f"<{i}>" for i in range(chunks)]


def test_replies_are_stamped_when_received() -> None:
    async def main() -> RequestOutput:
        client = ReaderClient()
        stream = WorkerStream(client, "m", "p", None, "r")
        before = time.perf_counter()
        client.callbacks["r"](output("r", 0), None)
        got = await stream.next()
        assert before <= got._received_s <= time.perf_counter()
        return got

    assert asyncio.run(main()).text == "<0>"


def test_a_stream_waiting_past_the_clients_timeout_fails_and_others_go_on() -> None:
    async def main() -> None:
        client = ReaderClient(timeout_s=0.3)
        silent = WorkerStream(client, "m", "p", None, "silent")
        busy = WorkerStream(client, "m", "p", None, "busy")

        async def feed() -> None:  # the busy one gets a reply every 0.1 s for 0.8 s
            for i in range(8):
                await asyncio.sleep(0.1)
                client.callbacks["busy"](output("busy", i, i == 7), None)
            client.callbacks["busy"](None, None)

        feeder = asyncio.create_task(feed())
        start = time.monotonic()
        with pytest.raises(APIError) as failed:
            await silent.next()
        waited = time.monotonic() - start
        assert failed.value.status == 503 and "sent nothing for" in failed.value.message
        assert 0.3 <= waited < 1.5
        assert await read_all(busy) == [f"<{i}>" for i in range(8)]  # never timed out
        await feeder

    asyncio.run(main())


@pytest.mark.parametrize(("error", "status"), [
    (InvalidRequestError("prompt too long"), 400),
    (RemoteError("worker raised KeyError"), 500),
    (WorkerGone("worker at x died"), 503),
])
def test_error_replies_become_api_errors(error: Exception, status: int) -> None:
    async def main() -> APIError:
        client = ReaderClient()
        stream = WorkerStream(client, "m", "p", None, "r")
        client.callbacks["r"](output("r", 0), None)
        client.callbacks["r"](None, error)
        assert (await stream.next()).text == "<0>"  # what came before the error still does
        return await read_error(stream)

    failed = asyncio.run(main())
    assert failed.status == status and str(error) in failed.message


def test_an_output_carrying_an_error_is_a_400() -> None:
    async def main() -> None:
        client = ReaderClient()
        stream = WorkerStream(client, "m", "p", None, "r")
        bad = output("r", 0)
        bad.error = "stop string list too long"
        client.callbacks["r"](bad, None)
        failed = await read_error(stream)
        assert failed.status == 400 and "stop string" in failed.message

    asyncio.run(main())


def test_a_worker_gone_before_the_stream_starts_fails_its_first_read() -> None:
    async def main() -> None:
        failed = await read_error(WorkerStream(ReaderClient(gone=True), "m", "p", None, "r"))
        assert failed.status == 503 and "is gone" in failed.message

    asyncio.run(main())


def test_a_closed_stream_drops_what_comes_after() -> None:
    async def main() -> None:
        client = ReaderClient(timeout_s=0.2)
        stream = WorkerStream(client, "m", "p", None, "r")
        client.callbacks["r"](output("r", 0), None)
        await asyncio.sleep(0.01)  # delivered, not read
        stream.close()
        client.callbacks["r"](output("r", 1), None)
        await asyncio.sleep(0.01)
        assert not stream._items

    asyncio.run(main())


def test_a_reply_after_the_loop_closed_is_dropped_quietly() -> None:
    client = ReaderClient()

    async def main() -> None:
        WorkerStream(client, "m", "p", None, "r")

    asyncio.run(main())
    client.callbacks["r"](output("r", 0), None)  # no exception on the reader thread
    client.callbacks["r"](None, None)


def test_each_event_loop_reads_its_own_streams() -> None:
    results: dict[int, list[str]] = {}

    def serve(n: int) -> None:
        async def main() -> list[str]:
            client = ReaderClient()
            stream = WorkerStream(client, "m", "p", None, f"r{n}")

            def reply() -> None:
                for i in range(20):
                    client.callbacks[f"r{n}"](output(f"r{n}", i + 100 * n), None)
                client.callbacks[f"r{n}"](None, None)

            threading.Thread(target=reply).start()
            return await read_all(stream)

        results[n] = asyncio.run(main())

    threads = [threading.Thread(target=serve, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {n: [f"<{i + 100 * n}>" for i in range(20)] for n in range(3)}


def test_a_closed_loop_is_not_kept_alive_by_its_inbox() -> None:
    client = ReaderClient(timeout_s=5)
    ref = []

    async def main() -> None:
        ref.append(weakref.ref(asyncio.get_running_loop()))
        stream = WorkerStream(client, "m", "p", None, "r")
        waiting = asyncio.create_task(stream.next())  # a timeout check is due
        await asyncio.sleep(0.01)
        waiting.cancel()

    asyncio.run(main())
    client.callbacks.clear()
    gc.collect()
    assert ref[0]() is None


def relay_over(stream: WorkerStream) -> Relay:
    return Relay(None, None, "m", None, "r", None, stream, None)


def test_next_batch_takes_what_is_here_and_stops_before_an_error_or_the_end() -> None:
    async def main() -> None:
        client = ReaderClient()
        relay = relay_over(WorkerStream(client, "m", "p", None, "r"))
        reply = client.callbacks["r"]
        for i in range(3):
            reply(output("r", i), None)
        await asyncio.sleep(0.01)
        assert [o.text for o in await relay.next_batch()] == ["<0>", "<1>", "<2>"]
        reply(output("r", 3), None)
        reply(None, RemoteError("boom"))
        await asyncio.sleep(0.01)
        assert [o.text for o in await relay.next_batch()] == ["<3>"]  # sent before the error
        with pytest.raises(APIError):
            await relay.next_batch()

    asyncio.run(main())


def test_next_batch_ends_at_the_finished_output_and_waits_for_the_first() -> None:
    async def main() -> None:
        client = ReaderClient()
        relay = relay_over(WorkerStream(client, "m", "p", None, "r"))
        reply = client.callbacks["r"]
        asyncio.get_running_loop().call_later(0.05, reply, output("r", 0), None)
        assert [o.text for o in await relay.next_batch()] == ["<0>"]  # waited for it
        reply(output("r", 1, last=True), None)
        reply(None, None)
        await asyncio.sleep(0.01)
        assert [o.text for o in await relay.next_batch()] == ["<1>"]
        with pytest.raises(StopAsyncIteration):
            await relay.next_batch()

    asyncio.run(main())


def test_a_hand_over_is_not_taken_into_a_batch() -> None:
    async def main() -> None:
        client = ReaderClient()
        stream = WorkerStream(client, "m", "p", None, "r")
        relay = relay_over(stream)
        handed = output("r", 1)
        handed.finish_reason = FinishReason.HANDOVER
        client.callbacks["r"](output("r", 0), None)
        client.callbacks["r"](handed, None)
        await asyncio.sleep(0.01)
        assert [o.text for o in await relay.next_batch()] == ["<0>"]
        assert stream.ready() is False  # the hand-over waits for the next read

    asyncio.run(main())
