"""A request's stream of outputs from the workers, as the server's event loop reads it:
handed to the loop by the worker client's reader thread, and carried on across the
instances it is handed over to."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from prometheus_client import Counter

from warmserve.cluster.manager import LocalCluster
from warmserve.engine.engine import RequestOutput
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.engine.sequence import FinishReason
from warmserve.server.errors import APIError
from warmserve.worker.rpc import RemoteError, WorkerClient, WorkerGone

_END = object()
_WATCH_S = 1.0  # how often the streams waiting on a loop are checked for their timeouts
_INBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Inbox


def abort_quietly(worker, model: str, request_id: str) -> None:
    with contextlib.suppress(Exception):  # the worker may be gone; nothing left to stop
        worker.client.abort(model, request_id)


class Relay:
    """One request's outputs, across the instances it runs on. An instance drained for
    rebalancing hands its requests over (FinishReason.HANDOVER): the request goes on from
    another instance of its model, its prompt followed by the tokens it has sent and with the
    rest of its max_tokens, under the same id; the client sees one stream. Token counts are
    the request's own (its first prompt, all its output)."""

    def __init__(self, cluster: LocalCluster, acquire: Callable[[str], Awaitable[Any]],
                 model: str, params: SamplingParams, request_id: str, worker, stream: WorkerStream,
                 hand_overs: Counter) -> None:
        self.cluster, self.model, self.params, self.request_id = cluster, model, params, request_id
        self.acquire = acquire  # the server's: a worker, waiting for room as a new request does
        self.worker, self.stream = worker, stream
        self.sent = 0  # output tokens produced on the instances it left
        self.prompt_tokens: int | None = None  # its own prompt's length
        self.hand_overs = hand_overs  # the server's counter, this model's
        self._finished = False

    async def next(self) -> RequestOutput:
        while True:
            output = await self.stream.next()
            if self.prompt_tokens is None:
                self.prompt_tokens = output.num_prompt_tokens
            if output.finish_reason is not FinishReason.HANDOVER:
                output.num_prompt_tokens = self.prompt_tokens
                output.num_output_tokens += self.sent
                return output
            await self._resume(output)

    async def _resume(self, handed: RequestOutput) -> None:
        self.stream.close()
        self.release()
        self.sent = handed.resume.num_output_tokens  # all it has produced, on every instance
        self.hand_overs.inc()
        params = replace(self.params, max_tokens=self.params.max_tokens - self.sent)
        self.worker = await self.acquire(self.model)
        self.stream = WorkerStream(self.worker.client, self.model, handed.resume, params,
                                   self.request_id)

    def release(self) -> None:
        if self.worker is not None:
            self.cluster.release(self.worker, self.model)
            self.worker = None

    def close(self) -> None:
        self.stream.close()

    async def next_batch(self) -> list[RequestOutput]:
        """The next output and those after it that are already here: a stream that has
        fallen behind catches up in one write to its client, not one per token."""
        batch = [await self.__anext__()]
        while not self._finished and self.stream.ready():
            batch.append(await self.__anext__())
        return batch

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self.next()
        if item.finished:
            self._finished = True
        return item


class WorkerStream:
    """One generation on a worker, read by the server's event loop: the worker client's
    reader thread hands each reply to the loop's inbox (no thread per request, one wake of
    the loop per batch of replies); worker errors become API errors. A stream that waits
    `client.timeout_s` without a reply fails as a worker that is gone."""

    def __init__(self, client: WorkerClient, model: str, prompt: Any, params: SamplingParams,
                 request_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = _Inbox.of(self._loop)
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._waiting_since = 0.0
        self._closed = False
        self._timeout_s = client.timeout_s
        try:
            client.stream(model, prompt, params, request_id, self._on_reply)
        except WorkerGone as exc:  # delivered to the consumer, as any later failure
            self._deliver(exc)

    def _on_reply(self, output: RequestOutput | None, error: Exception | None) -> None:
        """On the client's reader thread."""
        if self._closed:
            return
        if output is not None:
            output._received_s = time.perf_counter()
            self._inbox.put(self, output)
        else:
            self._inbox.put(self, error or _END)

    def _deliver(self, item: object) -> None:
        """On the loop."""
        if self._closed:
            return
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def ready(self) -> bool:
        """Whether the next item is here and is an output to send as it is (not the end, an
        error or a hand-over, which may wait)."""
        if not self._items:
            return False
        item = self._items[0]
        return (isinstance(item, RequestOutput) and not item.error
                and item.finish_reason is not FinishReason.HANDOVER)

    async def next(self) -> RequestOutput:
        if not self._items:
            self._waiter = self._loop.create_future()
            self._waiting_since = self._loop.time()
            self._inbox.watch(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._inbox.waiting.discard(self)
        item = self._items.popleft()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, InvalidRequestError):
            raise APIError(400, str(item))
        if isinstance(item, WorkerGone):
            raise APIError(503, f"the worker serving this request failed: {item}",
                           "server_error", retry_after_s=1)
        if isinstance(item, BaseException):
            raise APIError(500 if isinstance(item, RemoteError) else 503, str(item),
                           "server_error")
        if item.error:
            raise APIError(400, item.error)
        return item

    def close(self) -> None:
        self._closed = True
        self._items.clear()


class _Inbox:
    """Replies from the worker clients' reader threads to one event loop, in batches: a
    reader appends and wakes the loop only where it is not already due to drain, so a
    step's replies for a whole batch cost the loop one wake, not one each. It also times out
    the streams waiting on it, once a second (a timer per wait cost more than the chunk)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the loop's entry in _INBOXES goes with the loop
        self.items: deque[tuple[WorkerStream, object]] = deque()
        self.lock = threading.Lock()
        self.due = False
        self.waiting: set[WorkerStream] = set()
        self.watching = False  # a check is due (not its timer handle: that holds the loop)

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop) -> _Inbox:
        inbox = _INBOXES.get(loop)
        if inbox is None:
            inbox = _INBOXES[loop] = _Inbox(loop)
        return inbox

    def put(self, stream: WorkerStream, item: object) -> None:
        """On any thread."""
        self.items.append((stream, item))
        with self.lock:
            if self.due:
                return
            self.due = True
        loop = self._loop()
        with contextlib.suppress(RuntimeError, AttributeError):  # the loop has closed, or gone
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            self.due = False  # what a reader appends from now on wakes the loop again
        items = self.items
        while items:
            stream, item = items.popleft()
            stream._deliver(item)

    def watch(self, stream: WorkerStream) -> None:
        self.waiting.add(stream)
        if not self.watching:
            self.watching = True
            asyncio.get_running_loop().call_later(min(_WATCH_S, stream._timeout_s), self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for stream in [s for s in self.waiting if now - s._waiting_since >= s._timeout_s]:
            self.waiting.discard(stream)
            stream._deliver(WorkerGone(f"the worker sent nothing for {stream._timeout_s:g} s"))
        self.watching = bool(self.waiting)
        if self.watching:
            loop.call_later(min(_WATCH_S, *(s._timeout_s for s in self.waiting)), self._check)
