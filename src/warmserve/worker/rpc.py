"""A small RPC layer over `multiprocessing.connection` (standard library, Unix sockets).

Client → server: one tuple per call, `(call_id, verb, kwargs)`. Server → client: replies
`(call_id, "ok", result)`, `(call_id, "error", (kind, message))`, and for `generate` a series of
`(call_id, "chunk", RequestOutput)` ending with `(call_id, "end", None)`, sent in lists: what
queues up while one message is on its way goes in the next (an engine step's chunks for all
its requests, one pickle and one write rather than one each). Each call runs on its own
thread in the server, so a slow `activate` never blocks a `stats`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from warmserve.engine.engine import RequestOutput
from warmserve.engine.loop import RequestStream
from warmserve.engine.parallel import Shard
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.worker.worker import Group, Refused, UniversalWorker

log = logging.getLogger(__name__)

VERBS = ("prewarm", "activate", "deactivate", "evict", "lend", "reclaim", "stats", "abort",
         "hand_over", "generate", "ping")


class WorkerGone(ConnectionError):
    """The worker process is unreachable or died; its calls fail with this."""


class RemoteError(RuntimeError):
    """An unexpected error inside the worker; the message carries its description."""


class WorkerServer:
    def __init__(self, worker: UniversalWorker, address: str, authkey: bytes) -> None:
        self.worker = worker
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self.address = address

    def serve_forever(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _serve(self, conn: Connection) -> None:
        outbox = _Outbox(conn)
        while True:
            try:
                call_id, verb, kwargs = conn.recv()
            except (EOFError, OSError):
                outbox.close()
                return
            threading.Thread(target=self._call, args=(outbox.put, call_id, verb, kwargs),
                             daemon=True).start()

    def _call(self, send, call_id: int, verb: str, kwargs: dict) -> None:
        try:
            if verb not in VERBS:
                raise Refused(f"unknown verb {verb!r}")
            if verb == "ping":
                send((call_id, "ok", "pong"))
            elif verb == "generate":
                self._stream(send, call_id, self.worker.generate(**kwargs))
            else:
                send((call_id, "ok", getattr(self.worker, verb)(**kwargs)))
        except (Refused, InvalidRequestError) as exc:
            send((call_id, "error", (type(exc).__name__, str(exc))))
        except Exception as exc:  # reported to the caller, the worker lives on
            log.exception("worker call %s failed", verb)
            send((call_id, "error", ("RemoteError", f"{verb}: {exc}")))

    @staticmethod
    def _stream(send, call_id: int, stream: RequestStream) -> None:
        """Send a request's outputs as the engine loop delivers them (no thread waits on
        the stream); if the client has gone, abort the request: nobody would read the rest."""
        gone = False

        def sink(output: RequestOutput | None) -> None:
            nonlocal gone
            if gone:
                return
            try:
                send((call_id, "chunk", output) if output is not None else (call_id, "end", None))
            except OSError:
                gone = True
                stream.abort()

        stream.forward(sink)


class _Outbox:
    """The replies on one connection, sent by one thread in lists: whatever queues up while a
    list is being sent goes in the next. `put` raises OSError once the connection is closed
    or broken, so that a generation whose client has gone stops (as a failed send did)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: list[tuple] = []
        self._ready = threading.Condition()
        self._open = True
        threading.Thread(target=self._send_all, daemon=True, name="worker-outbox").start()

    def put(self, message: tuple) -> None:
        with self._ready:
            if not self._open:
                raise OSError("the client's connection is closed")
            self._pending.append(message)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._open = False
            self._ready.notify()

    def _send_all(self) -> None:
        while True:
            with self._ready:
                while self._open and not self._pending:
                    self._ready.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                self._send(batch)
            except OSError:
                self.close()
                return

    def _send(self, batch: list[tuple]) -> None:
        try:
            self._conn.send(batch)  # pickled whole before a byte is written
        except OSError:
            raise
        except Exception:  # a reply that does not pickle: its call fails, the others go
            for call_id, kind, payload in batch:
                try:
                    self._conn.send([(call_id, kind, payload)])
                except OSError:
                    raise
                except Exception as exc:
                    log.exception("reply to call %s cannot be sent", call_id)
                    self._conn.send([(call_id, "error", ("RemoteError",
                                                         f"the reply cannot be sent: {exc}"))])


def reply_error(kind: str, payload: Any) -> Exception:
    """The exception an error reply stands for (`kind` "error" or "gone")."""
    if kind == "gone":
        return WorkerGone(payload)
    error_kind, message = payload
    if error_kind == "Refused":
        return Refused(message)
    if error_kind in ("InvalidRequestError", "ChatTemplateError"):
        return InvalidRequestError(message)
    return RemoteError(message)


class WorkerClient:
    """The one seam through which the controller and router reach a worker."""

    def __init__(self, address: str, authkey: bytes, timeout_s: float = 600.0) -> None:
        try:
            self._conn = Client(address, family="AF_UNIX", authkey=authkey)
        except OSError as exc:
            raise WorkerGone(f"cannot reach worker at {address}: {exc}") from None
        self.address = address
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        self._replies: dict[int, Callable[[tuple[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._alive = True
        self._reader = threading.Thread(target=self._read, daemon=True, name="worker-client")
        self._reader.start()

    def call(self, verb: str, **kwargs: Any) -> Any:
        replies = self._send(verb, kwargs)
        kind, payload = self._next(replies)
        return self._result(kind, payload)

    def generate(self, model: str, prompt: Any, params: SamplingParams,
                 request_id: str | None = None) -> Iterator[RequestOutput]:
        replies = self._send("generate", {"name": model, "prompt": prompt, "params": params,
                                          "request_id": request_id})
        while True:
            kind, payload = self._next(replies)
            if kind == "chunk":
                yield payload
            elif kind == "end":
                return
            else:
                self._result(kind, payload)

    def stream(self, model: str, prompt: Any, params: SamplingParams, request_id: str | None,
               on_reply: Callable[[RequestOutput | None, Exception | None], None]) -> None:
        """Start a generation whose replies the reader thread hands to `on_reply` as they
        arrive, no thread waiting on it: `(output, None)` per chunk, `(None, None)` at the
        end, or `(None, error)` once (the worker refused or failed it, or is gone). Raises
        WorkerGone if the worker cannot be reached. `on_reply` must be quick and must not
        raise."""

        def deliver(reply: tuple[str, Any]) -> None:
            kind, payload = reply
            if kind == "chunk":
                on_reply(payload, None)
            elif kind == "end":
                on_reply(None, None)
            else:
                on_reply(None, reply_error(kind, payload))

        self._send("generate", {"name": model, "prompt": prompt, "params": params,
                                "request_id": request_id}, deliver)

    def close(self) -> None:
        """Close the connection: the worker sees it at once (and stops this client's
        generations), and the reader thread ends before the descriptor is closed. Closing
        the descriptor alone woke neither, and a reader still holding its number could read
        from the next connection that got it (seen: a new client's handshake failing with
        "bad message length")."""
        self._alive = False
        with contextlib.suppress(OSError), socket.fromfd(
                self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)  # the reader's receive returns: end of file
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=10)
        self._conn.close()

    # verbs
    def prewarm(self, model: str, wait: bool = False, shard: Shard | None = None,
                make_room: bool = False) -> str:
        return self.call("prewarm", name=model, wait=wait, shard=shard,
                         make_room=make_room).value

    def activate(self, model: str, group: Group | None = None) -> None:
        self.call("activate", name=model, group=group)

    def deactivate(self, model: str) -> None:
        self.call("deactivate", name=model)

    def evict(self, model: str) -> None:
        self.call("evict", name=model)

    def lend(self, model: str, num_pages: int) -> int:
        return self.call("lend", name=model, num_pages=num_pages)

    def reclaim(self, model: str) -> int:
        return self.call("reclaim", name=model)

    def abort(self, model: str, request_id: str) -> None:
        self.call("abort", name=model, request_id=request_id)

    def hand_over(self, model: str) -> None:
        self.call("hand_over", name=model)

    def stats(self) -> dict:
        return self.call("stats")

    # plumbing
    def _send(self, verb: str, kwargs: dict,
              deliver: Callable[[tuple[str, Any]], None] | None = None
              ) -> queue.SimpleQueue | None:
        """Send a call; its replies go to `deliver` on the reader thread, or else to the
        queue returned."""
        if not self._alive:
            raise WorkerGone(f"worker at {self.address} is gone")
        call_id = next(self._ids)
        replies: queue.SimpleQueue | None = None
        if deliver is None:
            replies = queue.SimpleQueue()
            deliver = replies.put
        with self._lock:
            self._replies[call_id] = deliver
            try:
                self._conn.send((call_id, verb, kwargs))
            except OSError as exc:
                self._alive = False
                self._replies.pop(call_id, None)
                raise WorkerGone(f"worker at {self.address} is gone: {exc}") from None
        return replies

    def _next(self, replies: queue.SimpleQueue) -> tuple[str, Any]:
        try:
            return replies.get(timeout=self.timeout_s)
        except queue.Empty:
            raise WorkerGone(f"worker at {self.address} did not answer in "
                             f"{self.timeout_s:.0f} s") from None

    def _result(self, kind: str, payload: Any) -> Any:
        if kind == "ok":
            return payload
        raise reply_error(kind, payload)

    def _read(self) -> None:
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                break
            for call_id, kind, payload in batch:
                deliver = self._replies.get(call_id)
                if deliver is not None:
                    if kind in ("ok", "error", "end"):
                        self._replies.pop(call_id, None)
                    deliver((kind, payload))
        self._alive = False
        with self._lock:
            waiting = list(self._replies.values())
            self._replies.clear()
        for deliver in waiting:  # fail every waiting call at once
            deliver(("gone", f"worker at {self.address} died"))
