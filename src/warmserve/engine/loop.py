"""The engine loop in its own thread, with a thread-safe, async-friendly front.

Callers `submit` a prompt (text, chat messages or token ids) and get a `RequestStream` to
iterate, synchronously or with `async for`. Commands cross into the loop thread through one
queue; the engine itself is only ever touched by that thread. A request rejected by validation
raises at `submit` and never reaches the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from warmserve.engine.engine import EngineStats, LLMEngine, RequestOutput, Resume
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.engine.sequence import FinishReason

log = logging.getLogger(__name__)

_DONE = object()
SLOW_STEP_S = 1.0  # a step longer than this is logged with what it ran,
SLOW_STEP_LOG_EVERY_S = 30.0  # at most once in this long per engine (CPU engines are slow)
STALL_RETRY_S = 0.05  # a loop whose step ran nothing steps again after this, or on a command


class EngineShutDown(RuntimeError):
    """The engine loop is shut down (its model was deactivated): it takes nothing more."""


class RequestStream:
    """The outputs of one request, in order; the last has `finished=True`."""

    def __init__(self, request_id: str, num_prompt_tokens: int,
                 abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._abort = abort
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        with contextlib.suppress(RuntimeError):  # not inside an event loop: sync iteration
            self._loop = asyncio.get_running_loop()
            self._aqueue = asyncio.Queue()
        self._sink: Callable[[RequestOutput | None], None] | None = None
        self._sink_lock = threading.Lock()

    def put(self, item: RequestOutput | object) -> None:
        """Called by the loop thread."""
        if self._loop is not None and self._aqueue is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop has closed
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            return
        with self._sink_lock:
            if self._sink is None:
                self._queue.put(item)
            else:
                self._sink(None if item is _DONE else item)

    def end(self) -> None:
        """Called by the loop thread after the last output."""
        self.put(_DONE)

    def forward(self, sink: Callable[[RequestOutput | None], None]) -> None:
        """Hand every output to `sink` on the loop thread, and None after the last, instead
        of queueing it for an iterating thread (what is queued already goes first): a worker
        streams many requests without a thread waiting on each. `sink` must be quick and
        must not raise."""
        if self._aqueue is not None:
            raise RuntimeError("this stream was created inside an event loop; iterate it")
        with self._sink_lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                sink(None if item is _DONE else item)
            self._sink = sink

    def abort(self) -> None:
        self._abort(self.request_id)

    def __iter__(self) -> Iterator[RequestOutput]:
        while (item := self._queue.get()) is not _DONE:
            yield item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._aqueue is None:
            raise RuntimeError("this stream was created outside an event loop; iterate it sync")
        while (item := await self._aqueue.get()) is not _DONE:
            yield item

    def collect(self) -> RequestOutput:
        """Wait for the end and merge all outputs into one (synchronous streams)."""
        parts = list(self)
        last = parts[-1]
        return RequestOutput(
            self.request_id, [t for p in parts for t in p.token_ids],
            "".join(p.text for p in parts),
            [lp for p in parts for lp in p.logprobs], True, last.finish_reason,
            last.num_prompt_tokens, last.num_output_tokens, last.error,
        )


class EngineLoop:
    """Runs `engine.step()` in a daemon thread while there is work."""

    def __init__(self, engine: LLMEngine, name: str = "engine") -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._name = name
        self._stopping = threading.Event()
        self._step_started: float | None = None  # set while a step runs (read by other threads)
        self.num_steps = 0
        self.num_slow_steps = 0
        self._slow_logged = (-float("inf"), 0)  # (when, num_slow_steps then)
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def submit(self, prompt: str | list[int] | list[dict[str, Any]] | Resume,
               params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request (or resume one handed over by another engine); raises
        InvalidRequestError for bad input (nothing is queued)."""
        if self._stopping.is_set():
            raise EngineShutDown(f"engine {self._name!r} is shut down")
        resume = prompt if isinstance(prompt, Resume) else None
        token_ids = list(resume.token_ids) if resume else self._encode(prompt)
        self.engine.validate(token_ids, params)
        request_id = request_id or f"{self._name}-{next(self._ids)}"
        stream = RequestStream(request_id, len(token_ids), self.abort)
        self._commands.put(("add", (request_id, token_ids, params, stream, resume)))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def hand_over(self) -> None:
        """Stop every request to go on elsewhere (LLMEngine.hand_over_all)."""
        self._commands.put(("hand_over", None))

    def call(self, fn: Callable[[LLMEngine], Any], timeout_s: float = 30.0) -> Any:
        """Run `fn(engine)` on the loop thread between steps and return its result. Raises
        queue.Empty if the loop does not get to it within `timeout_s` (a step is stuck), and
        EngineShutDown if the loop is shut down (before or while waiting)."""
        if self._stopping.is_set():
            raise EngineShutDown(f"engine {self._name!r} is shut down")
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._commands.put(("call", (fn, done)))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ok, value = done.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                break
            except queue.Empty:
                if not self._thread.is_alive():  # shut down after this call was queued
                    raise EngineShutDown(f"engine {self._name!r} is shut down") from None
                if time.monotonic() >= deadline:
                    raise
        if not ok:
            raise value
        return value

    def post(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Run `fn(engine)` on the loop thread between steps, without waiting for it."""
        self._commands.put(("call", (fn, queue.SimpleQueue())))

    def stats(self, timeout_s: float = 30.0) -> EngineStats:
        return self.call(lambda engine: engine.stats(), timeout_s)

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def step_running_for(self) -> float | None:
        """Seconds the step now running has taken so far; None between steps. Safe to call
        from any thread: it is how a caller tells a slow step from a loop that is not stepping."""
        started = self._step_started
        return None if started is None else time.monotonic() - started

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout_s)

    def _encode(self, prompt: str | list[int] | list[dict[str, Any]]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        raise InvalidRequestError("prompt must be text, token ids or chat messages, not empty")

    def _run(self) -> None:
        device = self.engine.runner.device
        if device.type == "cuda":  # this thread launches the engine's kernels: make its
            torch.cuda.set_device(device)  # device current here (a new thread starts on device
            # 0, and Triton launches on the current one)
        stalled = False  # the last step could run nothing (e.g. no free KV blocks)
        while True:
            # Idle, wait for a command. Stalled, also wait (a command, such as a reclaim of
            # lent KV blocks, is what can unstall it), but look again now and then: a loop that
            # spun here would hold the GIL against every other engine of the process.
            idle = not self.engine.has_work()
            timeout = None if idle else STALL_RETRY_S if stalled else 0.0
            try:
                while True:
                    kind, arg = self._commands.get(block=timeout != 0.0, timeout=timeout)
                    timeout = 0.0
                    if kind == "stop":
                        self._fail_all("engine shut down")
                        return
                    self._handle(kind, arg)
            except queue.Empty:
                pass
            stalled = self.engine.has_work() and not self._step()

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            request_id, token_ids, params, stream, resume = arg
            try:
                self.engine.add_request(request_id, token_ids, params, resume)
                self._streams[request_id] = stream
            except InvalidRequestError as exc:
                stream.put(RequestOutput(request_id, [], "", finished=True,
                                         finish_reason=FinishReason.ERROR, error=str(exc)))
                stream.end()
        elif kind == "abort":
            output = self.engine.abort_request(arg)
            if output is not None:
                self._deliver(output)
        elif kind == "hand_over":
            for output in self.engine.hand_over_all():
                self._deliver(output)
        elif kind == "call":
            fn, done = arg
            try:
                done.put((True, fn(self.engine)))
            except Exception as exc:  # handed back to the caller's thread
                done.put((False, exc))

    def _step(self) -> bool:
        """One engine step; False if it could run nothing."""
        self._step_started = started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing its requests")
            self._fail_all(f"engine step failed: {exc}")
            return True
        finally:
            self._step_started = None
        took = time.monotonic() - started
        self.num_steps += 1
        if took > SLOW_STEP_S:
            self.num_slow_steps += 1
            last, count = self._slow_logged
            if started - last >= SLOW_STEP_LOG_EVERY_S:
                log.warning("%s: a step took %.2f s (%s); %d slow steps since the last report",
                            self._name, took, self.engine.last_step_summary(),
                            self.num_slow_steps - count)
                self._slow_logged = (started, self.num_slow_steps)
        for output in outputs:
            self._deliver(output)
        return self.engine.last_step_ran

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        stream.put(output)
        if output.finished:
            stream.end()
            del self._streams[output.request_id]

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
            self._deliver(RequestOutput(request_id, [], "", finished=True,
                                        finish_reason=FinishReason.ERROR, error=message))
