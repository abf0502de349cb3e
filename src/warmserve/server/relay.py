"""A request's stream of outputs from the workers, as the server's event loop reads it:
handed to the loop by the worker client's reader thread, and carried on across the
instances it is handed over to."""

from __future__ import annotations

import asyncio
import contextlib
import time
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
    reader thread hands each reply straight to the loop (no thread per request); worker
    errors become API errors."""

    def __init__(self, client: WorkerClient, model: str, prompt: Any, params: SamplingParams,
                 request_id: str) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._timeout_s = client.timeout_s
        try:
            client.stream(model, prompt, params, request_id, self._on_reply)
        except WorkerGone as exc:  # delivered to the consumer, as any later failure
            self._hand(exc)

    def _on_reply(self, output: RequestOutput | None, error: Exception | None) -> None:
        """On the client's reader thread."""
        if self._closed:
            return
        if output is not None:
            output._received_s = time.perf_counter()
            self._hand(output)
        else:
            self._hand(error or _END)

    def _hand(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the server's event loop has closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def next(self) -> RequestOutput:
        if not self._queue.empty():  # most chunks: no timer to set
            item = self._queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), self._timeout_s)
            except TimeoutError:
                item = WorkerGone(f"the worker sent nothing for {self._timeout_s:.0f} s")
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
