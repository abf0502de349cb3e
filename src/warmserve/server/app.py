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
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
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
from warmserve.engine.sampling import InvalidRequestError
from warmserve.server.errors import APIError
from warmserve.server.relay import Relay, WorkerStream, abort_quietly
from warmserve.server.schemas import ChatCompletionRequest, CompletionRequest


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
    front = _Frontend(cluster, config, controller)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        front.close()

    app = FastAPI(title="WarmServe", version="0.1.0", lifespan=lifespan)
    _install_guards(app, config)

    @app.get("/health")
    async def health() -> dict:
        alive = sum(1 for w in cluster.workers if w.alive)
        return {"status": "ok" if alive else "degraded", "workers_alive": alive,
                "workers": len(cluster.workers)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "warmserve"}
            for m in front.models]}

    @app.get("/v1/cluster")
    async def cluster_view() -> dict:
        view = cluster.snapshot()
        if controller is not None:
            view["controller_actions"] = [
                {"t": t, "action": a, "model": m, "worker": w} for t, a, m, w in controller.actions]
        return view

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        front.metrics.refresh(cluster, front.models)
        return PlainTextResponse(generate_latest(front.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server yet", param="logprobs")
        return await front.serve(body, body.chat(), "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if body.logprobs is not None or body.echo:
            raise APIError(400, "logprobs and echo are not supported by this server yet",
                           param="logprobs" if body.logprobs is not None else "echo")
        return await front.serve(body, body.prompt, "text_completion")

    return app


def _install_guards(app: FastAPI, config: WarmServeConfig) -> None:
    """OpenAI-shaped errors for bad requests; body size and API key checked before a route."""
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

    app.add_middleware(_Guard, max_body_bytes=config.server.max_body_bytes, keys=keys)


class _Guard:
    """Body size and API key, checked before a route. A plain ASGI middleware: starlette's
    `BaseHTTPMiddleware` passes every chunk of a streamed response through a memory stream
    of its own, which cost more server CPU than the rest of a token's path."""

    def __init__(self, app, max_body_bytes: int, keys: set[str]) -> None:
        self.app, self.max_body_bytes, self.keys = app, max_body_bytes, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0").decode("latin-1")
        if not length.isdigit():
            return APIError(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > self.max_body_bytes:
            return APIError(413, f"request body of {length} bytes exceeds {self.max_body_bytes}")
        if self.keys and scope["path"].startswith("/v1/"):
            token = headers.get(b"authorization", b"").decode("latin-1")
            if token.removeprefix("Bearer ").strip() not in self.keys:
                return APIError(401, "invalid or missing API key", "authentication_error",
                                "invalid_api_key")
        return None


class _Frontend:
    """The completion path: admit a request, find it an instance (waiting for room where
    none serves its model), and relay its outputs, whole or as server-sent events."""

    def __init__(self, cluster: LocalCluster, config: WarmServeConfig, controller) -> None:
        self.cluster, self.config, self.controller = cluster, config, controller
        self.models = [m.name for m in config.models]
        self.metrics = _Metrics()
        # Asking the cluster for a model without an instance can block for as long as an
        # activation takes (seconds, or tens cold). Those calls get threads of their own, one
        # per model at most (acquire), so that they never take the threads other models'
        # requests use.
        self.activations = ThreadPoolExecutor(max_workers=max(1, len(self.models)),
                                              thread_name_prefix="warmserve-acquire")
        self.room_locks: dict[str, asyncio.Lock] = {m: asyncio.Lock() for m in self.models}

    def close(self) -> None:
        self.activations.shutdown(wait=False, cancel_futures=True)

    async def acquire(self, model: str):
        """A worker for `model`. Where no instance serves it, the request waits, counted in
        flight so that the controller sees it: one request per model at a time asks the
        cluster, which activates the model where there is room (or waits for an activation
        under way); the others wait their turn and find the instance it brought up. Where no
        worker has room the request waits for one (the controller may free one by
        rebalancing), asking again every _ROOM_POLL_S, for wait_for_room_s; then 503. Each
        request asks at least once."""
        cluster = self.cluster
        worker = cluster.route(model)
        if worker is not None:
            return worker
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.config.server.wait_for_room_s
        with cluster.waiting(model):
            async with self.room_locks[model]:
                while True:
                    try:  # not cancelled mid-call: the worker it picks counts the request
                        return await loop.run_in_executor(self.activations, cluster.acquire,
                                                          model)
                    except NoCapacity as exc:
                        last = exc
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(_ROOM_POLL_S, left))
        raise APIError(503, str(last), "server_error", retry_after_s=2)

    async def serve(self, body: Any, prompt: Any, kind: str):
        model = body.model
        if model not in self.models:
            raise APIError(404, f"The model `{model}` does not exist", code="model_not_found",
                           param="model")
        try:
            params = body.sampling()
        except InvalidRequestError as exc:
            raise APIError(400, str(exc)) from None
        if self.controller is not None:
            self.controller.record_arrival(model)
        if self.cluster.inflight(model) >= self.config.server.max_queued_per_model:
            self.metrics.requests.labels(model, "rejected").inc()
            raise APIError(429, f"too many requests in flight for {model}",
                           "rate_limit_error", retry_after_s=1)
        worker = await self.acquire(model)
        request_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        stream = Relay(self.cluster, self.acquire, model, params, request_id, worker,
                       WorkerStream(worker.client, model, prompt, params, request_id),
                       self.metrics.hand_overs.labels(model))
        try:
            first = await stream.next()
        except BaseException:
            stream.release()
            raise
        start = time.perf_counter()
        if body.stream:
            return StreamingResponse(self._sse(stream, first, body, kind, request_id, start),
                                     media_type="text/event-stream")
        try:
            outputs = [first] + [o async for o in stream]
        finally:
            stream.release()
        self._observe(model, outputs, start)
        return _full_response(outputs, model, kind, request_id)

    async def _sse(self, stream, first, body, kind, request_id, start) -> AsyncIterator[str]:
        created = int(time.time())
        outputs = [first]
        chunks = SSEChunks(body.model, kind, request_id, created)
        try:
            yield chunks.format(first, role=True)
            while not outputs[-1].finished:
                try:
                    batch = await stream.next_batch()
                except StopAsyncIteration:  # ended without a finished output
                    break
                outputs += batch
                yield "".join(chunks.format(o) for o in batch)
            if body.include_usage:
                yield _data({"id": request_id, "object": f"{kind}.chunk", "created": created,
                             "model": body.model, "choices": [], "usage": _usage(outputs)})
            yield "data: [DONE]\n\n"
            self._observe(body.model, outputs, start)
        except APIError as err:
            yield _data({"error": {"message": err.message, "type": err.kind}})
        except asyncio.CancelledError:  # the client went away: stop generating
            await asyncio.to_thread(abort_quietly, stream.worker, body.model, request_id)
            raise
        finally:
            stream.close()
            stream.release()

    def _observe(self, model: str, outputs: list[RequestOutput], start: float) -> None:
        metrics, last = self.metrics, outputs[-1]
        metrics.requests.labels(model, last.finish_reason.value if last.finish_reason
                                else "unknown").inc()
        times = [t for t in (getattr(o, "_received_s", None) for o in outputs) if t]
        if times:
            metrics.ttft.labels(model).observe(max(0.0, times[0] - start))
            if len(times) > 1:
                metrics.tpot.labels(model).observe((times[-1] - times[0]) / (len(times) - 1))


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


_TEXT = "\x00text\x00"  # stands for a chunk's text in SSEChunks' template


class SSEChunks:
    """A streamed request's server-sent events. The chunks between its first and its last
    differ only in their text, so the JSON around the text is encoded once, and each token
    encodes its text alone (encoding the whole chunk was a sixth of the server's CPU)."""

    def __init__(self, model: str, kind: str, request_id: str, created: int) -> None:
        self.model, self.kind, self.request_id, self.created = model, kind, request_id, created
        # the text is the last string of the payload, so its last occurrence is the text's
        self._head, self._tail = _data(self._payload(_TEXT, None, False)).rsplit(
            json.dumps(_TEXT), 1)

    def format(self, output: RequestOutput, role: bool = False) -> str:
        if role or output.finished:
            return _data(self._payload(output.text, _finish(output), role))
        return self._head + json.dumps(output.text) + self._tail

    def _payload(self, text: str, finish_reason: str | None, role: bool) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.kind == "chat.completion":
            choice["delta"] = {"role": "assistant", "content": text} if role else {
                "content": text}
            obj = "chat.completion.chunk"
        else:
            choice["text"] = text
            obj = "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model, "choices": [choice]}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
