"""The OpenAI-compatible HTTP API over the cluster: chat and text completions (streamed or not),
models, health, Prometheus metrics, and a read-only view of the cluster.

Every error is an OpenAI-style object with a 4xx/5xx status; no request hangs: a full model
queue answers 429, and a request for a model no worker can take waits for one up to
`server.wait_for_room_s` and then answers 503, both with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from warmserve.cluster.manager import LocalCluster, NoCapacity
from warmserve.config import WarmServeConfig
from warmserve.engine.engine import RequestOutput
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.engine.sequence import FinishReason
from warmserve.server.schemas import ChatCompletionRequest, CompletionRequest
from warmserve.worker.rpc import RemoteError, WorkerGone

_END = object()


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status, message, kind, code, param)
        self.retry_after_s = retry_after_s


def _error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
    body = {"error": {"message": err.message, "type": err.kind, "param": err.param,
                      "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=headers)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("warmserve_ttft_seconds", "Time to first token", ["model"],
                              buckets=buckets, registry=self.registry)
        self.tpot = Histogram("warmserve_tpot_seconds", "Time per output token", ["model"],
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
                              registry=self.registry)
        self.requests = Counter("warmserve_requests_total", "Requests by outcome",
                                ["model", "outcome"], registry=self.registry)
        self.queue = Gauge("warmserve_inflight_requests", "Requests in flight", ["model"],
                           registry=self.registry)
        self.instances = Gauge("warmserve_instances", "Active instances", ["model"],
                               registry=self.registry)
        self.prewarmed = Gauge("warmserve_prewarmed_replicas", "Prewarmed replicas", ["model"],
                               registry=self.registry)
        self.pages = Gauge("warmserve_pool_pages_used", "Pool pages in use", ["worker"],
                           registry=self.registry)
        self.replacements = Gauge("warmserve_worker_replacements", "Workers replaced",
                                  registry=self.registry)
        self.cold_starts = Gauge("warmserve_cold_starts", "Activations that loaded weights",
                                 registry=self.registry)
        self.prewarm_hits = Gauge("warmserve_prewarm_hits",
                                  "Activations of prewarmed weights", registry=self.registry)
        self.hand_overs = Counter("warmserve_hand_overs_total",
                                  "Requests resumed on another instance after a drain",
                                  ["model"], registry=self.registry)

    def refresh(self, cluster: LocalCluster, models: list[str]) -> None:
        for model in models:
            self.queue.labels(model).set(cluster.inflight(model))
            states = [w.state_of(model) for w in cluster.workers]
            self.instances.labels(model).set(states.count("active"))
            self.prewarmed.labels(model).set(states.count("prewarmed"))
        for w in cluster.workers:
            pool = w.stats.get("pool", {})
            self.pages.labels(w.name).set(pool.get("pages_total", 0) - pool.get("pages_free", 0))
        self.replacements.set(cluster.replacements)
        self.cold_starts.set(cluster.cold_starts)
        self.prewarm_hits.set(cluster.prewarm_hits)


_ROOM_POLL_S = 0.25  # how often a request waiting for room asks the cluster again


def create_app(cluster: LocalCluster, config: WarmServeConfig, controller=None) -> FastAPI:
    models = [m.name for m in config.models]
    # Asking the cluster for a model without an instance can block for as long as an
    # activation takes (seconds, or tens cold). Those calls get threads of their own, one per
    # model at most (below), so that they never take the threads other models' requests use.
    activations = ThreadPoolExecutor(max_workers=max(1, len(models)),
                                     thread_name_prefix="warmserve-acquire")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        activations.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="WarmServe", version="0.1.0", lifespan=lifespan)
    metrics = _Metrics()
    keys = set(config.server.api_keys)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, f"request body is not valid JSON: "
                                                 f"{first.get('ctx', {}).get('error', '')}"))
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return _error_response(APIError(400, message, param=param))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and int(length) > config.server.max_body_bytes:
            return _error_response(APIError(
                413, f"request body of {length} bytes exceeds {config.server.max_body_bytes}"))
        if keys and request.url.path.startswith("/v1/"):
            token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if token not in keys:
                return _error_response(APIError(401, "invalid or missing API key",
                                                "authentication_error", "invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        alive = sum(1 for w in cluster.workers if w.alive)
        return {"status": "ok" if alive else "degraded", "workers_alive": alive,
                "workers": len(cluster.workers)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "warmserve"} for m in models]}

    @app.get("/v1/cluster")
    async def cluster_view() -> dict:
        view = cluster.snapshot()
        if controller is not None:
            view["controller_actions"] = [
                {"t": t, "action": a, "model": m, "worker": w} for t, a, m, w in controller.actions]
        return view

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.refresh(cluster, models)
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server yet", param="logprobs")
        return await _serve(request, body, body.chat(), "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.logprobs is not None or body.echo:
            raise APIError(400, "logprobs and echo are not supported by this server yet",
                           param="logprobs" if body.logprobs is not None else "echo")
        return await _serve(request, body, body.prompt, "text_completion")

    room_locks: dict[str, asyncio.Lock] = {m: asyncio.Lock() for m in models}

    async def _acquire(model: str):
        """A worker for `model`. Where no instance serves it, the request waits, counted in
        flight so that the controller sees it: one request per model at a time asks the
        cluster, which activates the model where there is room (or waits for an activation
        under way); the others wait their turn and find the instance it brought up. Where no
        worker has room the request waits for one (the controller may free one by
        rebalancing), asking again every _ROOM_POLL_S, for wait_for_room_s; then 503. Each
        request asks at least once."""
        worker = cluster.route(model)
        if worker is not None:
            return worker
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + config.server.wait_for_room_s
        with cluster.waiting(model):
            async with room_locks[model]:
                while True:
                    try:  # not cancelled mid-call: the worker it picks counts the request
                        return await loop.run_in_executor(activations, cluster.acquire, model)
                    except NoCapacity as exc:
                        last = exc
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(_ROOM_POLL_S, left))
        raise APIError(503, str(last), "server_error", retry_after_s=2)

    async def _serve(request: Request, body: Any, prompt: Any, kind: str):
        if body.model not in models:
            raise APIError(404, f"The model `{body.model}` does not exist", code="model_not_found",
                           param="model")
        try:
            params = body.sampling()
        except InvalidRequestError as exc:
            raise APIError(400, str(exc)) from None
        if controller is not None:
            controller.record_arrival(body.model)
        if cluster.inflight(body.model) >= config.server.max_queued_per_model:
            metrics.requests.labels(body.model, "rejected").inc()
            raise APIError(429, f"too many requests in flight for {body.model}",
                           "rate_limit_error", retry_after_s=1)
        worker = await _acquire(body.model)
        request_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        stream = _Relay(cluster, _acquire, body.model, params, request_id, worker,
                        _Stream(worker.client.generate(body.model, prompt, params, request_id)),
                        metrics.hand_overs.labels(body.model))
        try:
            first = await stream.next()
        except BaseException:
            stream.release()
            raise
        start = time.perf_counter()
        if body.stream:
            return StreamingResponse(
                _sse(stream, first, body, kind, request_id, start),
                media_type="text/event-stream")
        try:
            outputs = [first] + [o async for o in stream]
        finally:
            stream.release()
        _observe(body.model, outputs, start)
        return _full_response(outputs, body.model, kind, request_id)

    async def _sse(stream, first, body, kind, request_id, start) -> AsyncIterator[str]:
        created = int(time.time())
        outputs = [first]
        try:
            yield _chunk(first, body.model, kind, request_id, created, role=True)
            async for output in stream:
                outputs.append(output)
                yield _chunk(output, body.model, kind, request_id, created)
            if body.include_usage:
                yield _data({"id": request_id, "object": f"{kind}.chunk", "created": created,
                             "model": body.model, "choices": [], "usage": _usage(outputs)})
            yield "data: [DONE]\n\n"
            _observe(body.model, outputs, start)
        except APIError as err:
            yield _data({"error": {"message": err.message, "type": err.kind}})
        except asyncio.CancelledError:  # the client went away: stop generating
            await asyncio.to_thread(_abort, stream.worker, body.model, request_id)
            raise
        finally:
            stream.close()
            stream.release()

    def _observe(model: str, outputs: list[RequestOutput], start: float) -> None:
        last = outputs[-1]
        metrics.requests.labels(model, last.finish_reason.value if last.finish_reason
                                else "unknown").inc()
        times = [t for t in (getattr(o, "_received_s", None) for o in outputs) if t]
        if times:
            metrics.ttft.labels(model).observe(max(0.0, times[0] - start))
            if len(times) > 1:
                metrics.tpot.labels(model).observe((times[-1] - times[0]) / (len(times) - 1))

    return app


def _abort(worker, model: str, request_id: str) -> None:
    with contextlib.suppress(Exception):  # the worker may be gone; nothing left to stop
        worker.client.abort(model, request_id)


class _Relay:
    """One request's outputs, across the instances it runs on. An instance drained for
    rebalancing hands its requests over (FinishReason.HANDOVER): the request goes on from
    another instance of its model, its prompt followed by the tokens it has sent and with the
    rest of its max_tokens, under the same id; the client sees one stream. Token counts are
    the request's own (its first prompt, all its output)."""

    def __init__(self, cluster: LocalCluster, acquire: Callable[[str], Awaitable[Any]],
                 model: str, params: SamplingParams, request_id: str, worker, stream: _Stream,
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
        self.stream = _Stream(self.worker.client.generate(
            self.model, handed.resume, params, self.request_id))

    def release(self) -> None:
        if self.worker is not None:
            self.cluster.release(self.worker, self.model)
            self.worker = None

    def close(self) -> None:
        self.stream.close()

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self.next()
        if item.finished:
            self._finished = True
        return item


class _Stream:
    """Bridges a blocking worker stream to asyncio through a thread; maps worker errors."""

    def __init__(self, iterator: Iterator[RequestOutput]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._closed = threading.Event()
        threading.Thread(target=self._pump, args=(iterator,), daemon=True).start()

    def _pump(self, iterator: Iterator[RequestOutput]) -> None:
        try:
            for item in iterator:
                item._received_s = time.perf_counter()
                self._hand(item)
                if self._closed.is_set():
                    return
            self._hand(_END)
        except BaseException as exc:  # delivered to the consumer
            self._hand(exc)

    def _hand(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the server's event loop has closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def next(self) -> RequestOutput:
        item = await self._queue.get()
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
        self._closed.set()


def _usage(outputs: list[RequestOutput]) -> dict:
    last = outputs[-1]
    return {"prompt_tokens": last.num_prompt_tokens, "completion_tokens": last.num_output_tokens,
            "total_tokens": last.num_prompt_tokens + last.num_output_tokens}


def _finish(output: RequestOutput) -> str | None:
    if not output.finished or output.finish_reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(output.finish_reason.value, "stop")


def _full_response(outputs: list[RequestOutput], model: str, kind: str, request_id: str) -> dict:
    text = "".join(o.text for o in outputs)
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(outputs[-1]), "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(outputs)}


def _chunk(output: RequestOutput, model: str, kind: str, request_id: str, created: int,
           role: bool = False) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(output), "logprobs": None}
    if kind == "chat.completion":
        delta: dict[str, Any] = {"content": output.text}
        if role:
            delta["role"] = "assistant"
        choice["delta"] = delta
        obj = "chat.completion.chunk"
    else:
        choice["text"] = output.text
        obj = "text_completion"
    return _data({"id": request_id, "object": obj, "created": created, "model": model,
                  "choices": [choice]})


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
