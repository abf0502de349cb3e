"""The universal worker of one device: many models' weights in one page pool, any of them
turned into a serving engine without copying.

A model here is ABSENT, PREWARMING (weights streaming into its slot), PREWARMED (weights in
place, the model object built over them) or ACTIVE (an engine serves it; its KV cache is mapped
beside the weights). Verbs: prewarm (background, cancellable), activate (a model not prewarmed
is loaded cold first), deactivate (back to PREWARMED), evict, lend / reclaim KV pages, generate,
abort, stats. What cannot fit is refused with a reason (`Refused`); nothing is left half-done.

A tensor-parallel model (`tensor_parallel` > 1) is held one shard per worker, and activated
on all the workers of its instance at once, each given its `Group` (the instance's name, its
shard, where the ranks meet). Rank 0 drives: it serves the requests and lends its KV blocks,
and tells the other ranks, which follow, what each step runs and which blocks' pages to unmap
or map again (engine/parallel.py).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from warmserve.config import EngineConfig, ModelConfig
from warmserve.engine.checkpoint import DTYPES, read_arch, resolve_checkpoint
from warmserve.engine.engine import create_engine, create_runner
from warmserve.engine.loader import build_model
from warmserve.engine.loop import EngineLoop, EngineShutDown, RequestStream
from warmserve.engine.parallel import JOIN_TIMEOUT_S, Shard, TensorParallel, follow
from warmserve.engine.sampling import SamplingParams
from warmserve.engine.tokenizer import Tokenizer
from warmserve.memory.host_cache import HostWeightCache
from warmserve.memory.layout import LayoutProvider, SlotLayout, plan_layout
from warmserve.memory.pool import PagePool, PoolFullError, Slot
from warmserve.memory.prewarm import PrewarmProgress, prewarm_slot

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0  # an engine that cannot answer between two steps this long is stuck
ENGINE_CALL_TIMEOUT_S = 30.0  # lend and reclaim wait this long for the engine to take them

FIRST_KV_BYTES = 256 << 20  # mapped before the first request; the rest follows in background
FOLLOWER_END_TIMEOUT_S = 10.0  # a follower shard waits this long for its driver's end


class Refused(RuntimeError):
    """The worker declines a request (no room, wrong state); the message says why."""


@dataclass(frozen=True)
class Group:
    """One worker's place in a tensor-parallel instance being activated: the instance's name
    (fresh for each activation), the shard this worker holds, and the key-value store where
    the instance's ranks meet."""

    instance: str
    shard: Shard
    store_host: str
    store_port: int


@dataclass(frozen=True)
class LendBlocks:
    """From a split instance's driver to its followers: these blocks are lent, unmap them."""

    blocks: tuple[int, ...]


@dataclass(frozen=True)
class ReclaimBlocks:
    """From a split instance's driver to its followers: map these blocks again (and say, by
    agreeing on it, whether every rank could)."""

    blocks: tuple[int, ...]


class ModelState(enum.Enum):
    PREWARMING = "prewarming"
    PREWARMED = "prewarmed"
    ACTIVE = "active"


@dataclass(eq=False)
class _Resident:
    config: ModelConfig
    checkpoint: Path
    layout: SlotLayout
    slot: Slot
    state: ModelState
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    model: torch.nn.Module | None = None
    tokenizer: Tokenizer | None = None
    loop: EngineLoop | None = None
    runner: Any = None  # kept across deactivations (fixed addresses: graphs stay valid)
    lent_blocks: list[int] = field(default_factory=list)
    kv_pending: Any = None
    progress: PrewarmProgress = field(default_factory=PrewarmProgress)
    stuck_reported: bool = False  # its engine's threads were dumped once (see _report_stuck)
    tp: TensorParallel | None = None  # a shard's place in the instance it is active in
    instance: str | None = None
    follower: threading.Thread | None = None  # a follower shard's step loop

    @property
    def shard(self) -> Shard:
        return self.layout.shard


class UniversalWorker:
    def __init__(self, pool: PagePool, models: list[ModelConfig], engine: EngineConfig,
                 cache_dir: Path, host_cache_bytes: int, kv_bytes: int | None = None,
                 first_kv_bytes: int = FIRST_KV_BYTES,
                 on_cache_progress: Callable[[str, int, int], None] | None = None) -> None:
        self.pool = pool
        self.device = pool.backend.device
        self.engine_config = engine
        self.models = {m.name: m for m in models}
        self.cache_dir = cache_dir
        self.host_cache = HostWeightCache(host_cache_bytes)
        pool_bytes = pool.num_pages * pool.page_bytes
        self.kv_bytes = kv_bytes or int((engine.kv_cache_gib or pool_bytes / (1 << 30)) * (1 << 30))
        self.first_kv_bytes = first_kv_bytes
        self.on_cache_progress = on_cache_progress
        self._residents: dict[str, _Resident] = {}
        self._lock = threading.RLock()

    # --- verbs ------------------------------------------------------------------------------

    def prewarm(self, name: str, wait: bool = False, shard: Shard | None = None,
                make_room: bool = False) -> ModelState:
        """Start streaming a model's weights (`shard` of them, for a tensor-parallel model)
        into a new slot; a no-op if they are resident. Another shard of the model held here
        is dropped first, unless it serves. `make_room`: evict what activate would."""
        shard = self._shard_of(name, shard)
        if make_room:
            self._make_room(name, shard)
        with self._lock:
            held = self._residents.get(name)
            if held is not None and held.shard != shard and held.state is ModelState.ACTIVE:
                raise Refused(f"{name}: shard {held.shard} serves here, not {shard}")
        if held is not None and held.shard != shard:
            with contextlib.suppress(Refused):  # dropped meanwhile
                self._drop(name).result()
        with self._lock:
            if name in self._residents:
                return self._residents[name].state
            resident = self._reserve(name, shard)
            thread = threading.Thread(target=self._prewarm_job, args=(resident,),
                                      name=f"prewarm-{name}", daemon=True)
            thread.start()
        if wait:
            self._wait_prewarmed(resident)
        return resident.state

    def activate(self, name: str, group: Group | None = None) -> None:
        """Turn a model into a serving engine; one not prewarmed is loaded cold first. Where
        the pool is short of its weights and first KV chunk, other models' copies that do not
        serve (prewarmed, or still prewarming) are evicted to make room: an activation evicts
        the prewarms on its GPU. A tensor-parallel model's shard is activated with its
        `group`, on every worker of the instance at once: each waits here for the others."""
        shard = self._shard_of(name, group.shard if group is not None else None)
        self._make_room(name, shard)
        self.prewarm(name, wait=True, shard=shard)
        with self._lock:
            resident = self._require(name)
            if resident.state is ModelState.ACTIVE:
                if group is not None and group.instance != resident.instance:
                    raise Refused(f"{name}: shard {shard} serves instance {resident.instance} "
                                  "here already")
                return
            self._wait_prewarmed(resident)
            try:
                if group is None:
                    self._map_kv_and_start(resident)
                else:
                    self._start_shard(resident, group)
            except Refused:
                self._unmap_kv(resident)
                raise
            except Exception as exc:  # out of memory, say: the model stays prewarmed
                log.exception("activating %s failed", name)
                self._unmap_kv(resident)
                raise Refused(f"{name}: activation failed: {exc}") from None

    def deactivate(self, name: str) -> None:
        """Stop serving; the weights stay in place (the model is prewarmed again)."""
        with self._lock:
            resident = self._require(name)
            if resident.state is not ModelState.ACTIVE:
                raise Refused(f"{name} is {resident.state.value}, not active")
            resident.state = ModelState.PREWARMED  # new requests are refused from here on
            if resident.loop is not None:  # none on a follower shard
                resident.loop.shutdown()
            if resident.tp is not None:
                self._leave_instance(resident)
            self._unmap_kv(resident)

    def evict(self, name: str) -> None:
        """Drop a resident model (cancelling a prewarm in progress); its pages return."""
        with self._lock:
            resident = self._require(name)
            if resident.state is ModelState.ACTIVE:
                self.deactivate(name)
        self._drop(name)

    def _drop(self, name: str) -> Future:
        """Drop a resident model that does not serve; the Future completes when its pages
        are free again. Refused if it serves."""
        with self._lock:
            resident = self._require(name)
            if resident.state is ModelState.ACTIVE:
                raise Refused(f"{name} is active")
            resident.cancel.set()
        resident.done.wait()
        return self._forget(resident)

    def _forget(self, r: _Resident) -> Future:
        """Take `r` out of the residents and drop its slot, if they are still its own (the
        model may have been prewarmed again since, under the same name); the Future completes
        when its pages are free again."""
        with self._lock:
            if self._residents.get(r.config.name) is r:
                del self._residents[r.config.name]
            if self.pool.slots.get(r.slot.name) is r.slot:
                return self.pool.drop_slot(r.slot.name)
        done: Future = Future()  # dropped already (a failed prewarm gives its pages back)
        done.set_result(None)
        return done

    def lend(self, name: str, num_pages: int) -> int:
        """Take free KV blocks of an active model out of service and give their pages back to
        the pool (for prewarms): up to `num_pages`, whole pages only, as many as are free when
        the engine takes the call (requests may have taken blocks since the caller looked).
        Returns the pages lent."""
        resident = self._serving(name)
        layout = resident.layout
        unit = layout.blocks_per_unit
        unit_pages = unit * layout.block_bytes // self.pool.page_bytes
        wanted = num_pages // unit_pages

        def take(engine) -> list[int]:
            bm = engine.block_manager
            blocks = bm.lend_units(min(wanted, len(bm.free_units(unit))), unit)
            if resident.tp is not None and blocks:  # before the next step: the followers
                resident.tp.send(LendBlocks(tuple(blocks)))  # unmap the same blocks' pages
            return blocks

        blocks = self._engine_call(resident, take)
        pages = sorted({p for b in blocks for p in layout.kv_pages(b, 1)})
        self.pool.unmap(resident.slot, pages).result()
        resident.lent_blocks += blocks
        return len(pages)

    def reclaim(self, name: str) -> int:
        """Map back every page lent by an active model and return its blocks to service."""
        resident = self._serving(name)
        blocks, layout = resident.lent_blocks, resident.layout
        pages = sorted({p for b in blocks for p in layout.kv_pages(b, 1)
                        if p not in resident.slot.pages})
        try:
            self.pool.map(resident.slot, pages).result()
        except PoolFullError as exc:
            raise Refused(f"{name}: cannot reclaim {len(pages)} pages: {exc}") from None

        def give_back(engine) -> None:
            if resident.tp is not None:  # every follower maps them first, or none returns
                resident.tp.send(ReclaimBlocks(tuple(blocks)))
                if not resident.tp.agree_min(1):
                    raise Refused(f"{name}: a follower shard has no room to reclaim "
                                  f"{len(blocks)} blocks")
            engine.block_manager.reclaim(blocks)

        self._engine_call(resident, give_back)
        resident.lent_blocks = []
        return len(pages)

    def generate(self, name: str, prompt: Any, params: SamplingParams,
                 request_id: str | None = None) -> RequestStream:
        return self._serving(name).loop.submit(prompt, params, request_id)

    def abort(self, name: str, request_id: str) -> None:
        self._serving(name).loop.abort(request_id)

    def hand_over(self, name: str) -> None:
        """Stop the model's requests to go on elsewhere (a drain for rebalancing)."""
        self._serving(name).loop.hand_over()

    def stats(self) -> dict:
        with self._lock:  # what is resident; the engines are asked outside the lock (below)
            residents = list(self._residents.items())
        models = {}
        for name, r in residents:
            entry = {"state": r.state.value, "pages": r.slot.num_mapped_pages,
                     "runner_ready": r.runner is not None,
                     "weight_bytes": r.layout.weight_bytes, "error": r.error,
                     "prewarm_bytes_done": r.progress.bytes_done,
                     "shard": [r.shard.rank, r.shard.size], "instance": r.instance}
            loop = r.loop
            if loop is not None:
                try:
                    s = loop.stats(timeout_s=STATS_TIMEOUT_S)
                except queue.Empty:  # its loop is stuck in a step: say so, answer the rest
                    entry["error"] = (f"engine not responding (no answer within "
                                      f"{STATS_TIMEOUT_S:.0f} s)")
                    self._report_stuck(r)
                    models[name] = entry
                    continue
                except EngineShutDown:  # deactivated since we looked: no engine to ask
                    models[name] = entry
                    continue
                entry |= {"running": s.num_running, "waiting": s.num_waiting,
                          "blocked": s.num_blocked,
                          "blocks_free": s.num_blocks_free, "blocks_lent": s.num_blocks_lent,
                          "blocks_usable": s.num_blocks_usable,
                          "block_bytes": r.layout.block_bytes,
                          "blocks_per_unit": r.layout.blocks_per_unit,
                          "tokens_per_s": s.tokens_per_s,
                          "prompt_tokens": s.prompt_tokens, "prefill_tokens": s.prefill_tokens,
                          "prefill_s": s.prefill_s, "busy_s": s.busy_s,
                          "finished": s.finished}
            models[name] = entry
        return {"device": str(self.device), "pool": self.pool.stats(), "models": models}

    def close(self) -> None:
        for name in list(self._residents):
            self.evict(name)
        self.pool.close()

    # --- internals --------------------------------------------------------------------------

    def _shard_of(self, name: str, shard: Shard | None) -> Shard:
        """The shard of a configured model asked for (the whole of a model on one device):
        refused where the model is unknown or split otherwise."""
        if name not in self.models:
            raise Refused(f"unknown model {name!r}; known: {', '.join(self.models)}")
        shard = shard or Shard()
        split = self.models[name].tensor_parallel
        if shard.size != split:
            raise Refused(f"{name} is split {split} way(s) (tensor_parallel={split}): a worker "
                          f"holds one of {split} shard(s), not shard {shard}")
        return shard

    def _layout(self, name: str, shard: Shard) -> tuple[Path, SlotLayout]:
        """A configured model's checkpoint and how its slot (for `shard`) would be laid out."""
        config = self.models[name]
        checkpoint = resolve_checkpoint(config.checkpoint, self.cache_dir)
        layout = plan_layout(read_arch(checkpoint), DTYPES[config.dtype], self.pool.page_bytes,
                             self.engine_config.block_size_tokens, self.kv_bytes, shard)
        return checkpoint, layout

    def _make_room(self, name: str, shard: Shard) -> None:
        """Evict other models' copies that do not serve until `name`'s weights (unless they
        are resident) and first KV chunk fit: those still prewarming first, then the largest."""
        with self._lock:
            resident = self._residents.get(name)
            if resident is not None and resident.state is ModelState.ACTIVE:
                return
            if resident is not None and resident.shard != shard:
                resident = None  # another shard: dropped by the prewarm
            layout = resident.layout if resident is not None else self._layout(name, shard)[1]
            needed = (0 if resident is not None else layout.weight_pages) + (
                self._first_kv_pages(layout) + 1)  # and the scratch block's page
            idle = sorted((r for n, r in self._residents.items()
                           if n != name and r.state is not ModelState.ACTIVE),
                          key=lambda r: (r.state is ModelState.PREWARMED, -len(r.slot.pages)))
        for victim in idle:
            if self.pool.can_map(needed):
                return
            log.info("evicting %s's prewarmed copy to activate %s", victim.config.name, name)
            with contextlib.suppress(Refused):  # activated meanwhile: it stays
                self._drop(victim.config.name).result()

    def _reserve(self, name: str, shard: Shard) -> _Resident:
        checkpoint, layout = self._layout(name, shard)
        config = self.models[name]
        needed = layout.weight_pages + self._first_kv_pages(layout)
        if not self.pool.can_map(needed):
            raise Refused(f"{name}: needs {needed} pages for weights and a first KV chunk, "
                          f"{self.pool.num_free_pages} are free")
        try:
            slot = self.pool.create_slot(name, layout.capacity_bytes)
        except PoolFullError as exc:
            raise Refused(f"{name}: {exc}") from None
        resident = _Resident(config, checkpoint, layout, slot, ModelState.PREWARMING)
        self._residents[name] = resident
        return resident

    def _prewarm_job(self, r: _Resident) -> None:
        try:
            arch = read_arch(r.checkpoint)
            key = r.config.name if r.shard.whole else f"{r.config.name} [{r.shard}]"
            host = self.host_cache.load(key, r.checkpoint, arch, r.layout,
                                        self.on_cache_progress)
            progress = prewarm_slot(self.pool, r.slot, host, cancel=r.cancel,
                                    progress=r.progress)
            if progress.cancelled:
                return
            provider = LayoutProvider(self.pool.view(r.slot), r.layout, filled=True)
            r.model = build_model(arch, r.checkpoint, r.layout.dtype, provider, r.shard)
            r.tokenizer = Tokenizer(r.checkpoint, arch)
            # a shard's runner sums over its instance's group: it is built on activation
            r.runner = self._build_runner(r) if r.shard.whole else None
            r.state = ModelState.PREWARMED
        except PoolFullError as exc:  # serving models' KV cache took the pages meanwhile
            log.warning("prewarm of %s abandoned: %s", r.config.name, exc)
            self._abandon(r, f"prewarm abandoned: {exc}")
        except Exception as exc:
            log.exception("prewarm of %s failed", r.config.name)
            self._abandon(r, f"prewarm failed: {exc}")
        finally:
            r.done.set()

    def _abandon(self, r: _Resident, reason: str) -> None:
        """A prewarm that failed gives its pages back at once; a caller waiting for it (an
        activation) is refused with the reason. `done` is set before the lock is taken: an
        activation may wait for it holding the lock."""
        r.error = reason
        r.done.set()
        self._forget(r)

    def _build_runner(self, r: _Resident) -> Any:
        """The model's runner, built while it is only prewarmed, so that its first activation
        does not capture CUDA graphs (0.4-0.7 s on the H100, docs/memory.md). Capture writes
        only the scratch block (graph padding rows), and Triton checks that each tensor's base
        address is mapped, so just the pages of the scratch block and of block 0 (the KV
        cache's base) are mapped for the capture and unmapped after; without free pages it
        is left to the activation."""
        layout = r.layout
        scratch = sorted({p for p in (*layout.kv_pages(layout.num_blocks - 1, 1),
                                      *layout.kv_pages(0, 1))
                          if p not in r.slot.pages})
        try:
            self.pool.map(r.slot, scratch).result()
        except PoolFullError:
            log.info("%s: no free page to capture graphs ahead; the activation will",
                     r.config.name)
            return None
        try:
            if self.device.type == "cuda":  # this runs on the prewarm thread: make the
                torch.cuda.set_device(self.device)  # device's context current (Triton needs it)
            return self._engine(r).runner
        finally:
            self.pool.unmap(r.slot, scratch).result()

    def _engine(self, r: _Resident):
        """An engine over the slot: the prewarmed model's weights as they lie, its runner if
        it has one (else built now, CUDA graphs included)."""
        return create_engine(
            r.checkpoint, self.engine_config, r.config.dtype, str(self.device),
            r.config.max_context, provider=LayoutProvider(self.pool.view(r.slot), r.layout, True),
            kv_cache_bytes=r.layout.kv_bytes, model=r.model, tokenizer=r.tokenizer,
            runner=r.runner)

    def _wait_prewarmed(self, r: _Resident) -> None:
        r.done.wait()
        if r.error or r.state is ModelState.PREWARMING:
            self._forget(r)
            raise Refused(f"{r.config.name}: {r.error or 'cancelled'}")

    def _first_kv_pages(self, layout: SlotLayout) -> int:
        """Pages mapped before the first request: `first_kv_bytes` of KV (whole blocks), or
        the whole cache if it is smaller."""
        first = max(layout.block_bytes, min(self.first_kv_bytes, layout.kv_bytes))
        return len(layout.kv_pages(0, -(-first // layout.block_bytes)))

    def _map_kv_and_start(self, r: _Resident) -> None:
        layout, page = r.layout, self.pool.page_bytes
        kv_pages = list(layout.kv_pages(0, layout.num_blocks))
        first = min(len(kv_pages), self._first_kv_pages(layout))
        # The first chunk maps now, with the scratch block (the last one: CUDA-graph padding
        # rows write there); as much of the rest as is free maps behind it. Blocks whose pages
        # are not mapped yet start out of service: staged ones return when their pages land,
        # the others stay lent until `reclaim`.
        scratch = list(layout.kv_pages(layout.num_blocks - 1, 1))
        now = sorted(set(kv_pages[:first]) | set(scratch))
        try:
            self.pool.map(r.slot, now).result()
        except PoolFullError as exc:
            raise Refused(f"{r.config.name}: no room for a KV cache: {exc}") from None
        rest = [p for p in kv_pages[first:] if p not in r.slot.pages][: self.pool.num_free_pages]
        r.kv_pending = self.pool.map(r.slot, rest) if rest else None
        engine = self._engine(r)
        r.runner = engine.runner
        bm = engine.block_manager
        ready_now = first * page // layout.block_bytes
        ready_later = (first + len(rest)) * page // layout.block_bytes  # a contiguous prefix
        staged = list(range(min(ready_now, bm.num_blocks), min(ready_later, bm.num_blocks)))
        unmapped = list(range(min(ready_later, bm.num_blocks), bm.num_blocks))
        bm.withhold(staged + unmapped)
        r.lent_blocks = unmapped
        r.loop = EngineLoop(engine, r.config.name)
        r.state = ModelState.ACTIVE
        if staged:
            loop = r.loop
            r.kv_pending.add_done_callback(
                lambda _: loop.post(lambda e: e.block_manager.reclaim(staged)))

    def _start_shard(self, r: _Resident, group: Group) -> None:
        """Activate a shard of a split instance: meet the other ranks, agree on the KV blocks
        every one of them holds, and start the driver's engine or the follower's loop. Each
        rank maps its share of the cache before serving, none in the background as for a
        whole model: a block the driver hands out must be mapped on every rank."""
        layout, name = r.layout, r.config.name
        store = dist.TCPStore(group.store_host, group.store_port, is_master=False,
                              timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        try:
            tp = TensorParallel.join(store, group.instance, group.shard, self.device)
        except TimeoutError as exc:
            raise Refused(f"{name}: {exc}") from None
        try:
            blocks = tp.agree_min(layout.num_blocks - 1)  # the scratch block is `blocks`
            kv_pages = list(layout.kv_pages(0, blocks))
            first = min(len(kv_pages), self._first_kv_pages(layout))
            now = sorted(p for p in {*kv_pages[:first], *layout.kv_pages(blocks, 1)}
                         if p not in r.slot.pages)
            try:
                self.pool.map(r.slot, now).result()
                mapped = 1
            except PoolFullError:
                mapped = 0
            if not tp.agree_min(mapped):
                raise Refused(f"{name}: no room for a KV cache on "
                              f"{'this shard' if not mapped else 'another shard'}")
            rest = [p for p in kv_pages[first:] if p not in r.slot.pages]
            rest = rest[: self.pool.num_free_pages]
            if rest:
                self.pool.map(r.slot, rest).result()
            ready = tp.agree_min(min(blocks, (first + len(rest)) * self.pool.page_bytes
                                     // layout.block_bytes))
            if self.device.type == "cuda":  # an RPC thread: make the device current
                torch.cuda.set_device(self.device)
            args = (r.checkpoint, self.engine_config, r.config.dtype, str(self.device),
                    r.config.max_context)
            kwargs = {"provider": LayoutProvider(self.pool.view(r.slot), layout, True),
                      "kv_cache_bytes": (blocks + 1) * layout.block_bytes, "model": r.model,
                      "tp": tp}
            if tp.is_driver:
                engine = create_engine(*args, tokenizer=r.tokenizer, **kwargs)
                r.runner = engine.runner
                r.lent_blocks = list(range(ready, blocks))  # no pages on some rank
                engine.block_manager.withhold(r.lent_blocks)
                r.loop = EngineLoop(engine, name)
            else:
                r.runner = create_runner(*args, **kwargs)
                r.follower = threading.Thread(target=self._follow, args=(r, r.runner, tp),
                                              name=f"follow-{name}", daemon=True)
        except BaseException:
            tp.close()
            r.runner = r.follower = None
            raise
        r.tp, r.instance = tp, group.instance
        r.state = ModelState.ACTIVE
        if r.follower is not None:
            r.follower.start()

    def _follow(self, r: _Resident, runner: Any, tp: TensorParallel) -> None:
        """A follower shard's loop: the driver's steps and lend/reclaim messages, until the
        driver ends the instance. If the driver is lost (its worker died), the shard goes
        back to prewarmed."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            follow(runner, tp, lambda message: self._on_driver_message(r, tp, message))
        except Exception as exc:
            if r.tp is not tp or r.state is not ModelState.ACTIVE:
                return  # deactivated meanwhile: its groups were closed under it
            log.error("%s: shard %s lost instance %s (%s); back to prewarmed", r.config.name,
                      r.shard, r.instance, exc)
            with contextlib.suppress(Refused):  # deactivated meanwhile
                self.deactivate(r.config.name)

    def _on_driver_message(self, r: _Resident, tp: TensorParallel, message: Any) -> None:
        pages = sorted({p for b in message.blocks for p in r.layout.kv_pages(b, 1)})
        if isinstance(message, LendBlocks):
            self.pool.unmap(r.slot, pages).result()
        elif isinstance(message, ReclaimBlocks):
            try:
                self.pool.map(r.slot, [p for p in pages if p not in r.slot.pages]).result()
                mapped = 1
            except PoolFullError:
                log.warning("%s: no room to reclaim %d KV pages", r.config.name, len(pages))
                mapped = 0
            tp.agree_min(mapped)
        else:
            raise ValueError(f"a follower cannot handle {type(message).__name__}")

    def _leave_instance(self, r: _Resident) -> None:
        """End a shard's part in its instance (a driver's engine loop has stopped): the
        driver tells the followers that no step follows, and a follower waits for that; then
        the groups close, and the runner goes with them (its CUDA graphs hold the group)."""
        tp, follower = r.tp, r.follower
        if tp.is_driver:
            try:
                r.runner.close()
            except Exception as exc:  # a follower's worker died: the others see it too
                log.warning("%s: could not end instance %s on the followers: %s",
                            r.config.name, r.instance, exc)
        elif follower is not threading.current_thread():
            follower.join(FOLLOWER_END_TIMEOUT_S)
            if follower.is_alive():
                log.warning("%s: instance %s's driver did not end it within %.0f s; leaving",
                            r.config.name, r.instance, FOLLOWER_END_TIMEOUT_S)
        tp.close()
        r.tp = r.instance = r.follower = r.runner = None

    def _unmap_kv(self, r: _Resident) -> None:
        """Give back every KV page of a slot; the weights stay (PREWARMED)."""
        if r.kv_pending is not None:
            r.kv_pending.result()
        kv = [p for p in r.layout.kv_pages(0, r.layout.num_blocks) if p in r.slot.pages]
        self.pool.unmap(r.slot, kv).result()
        r.loop, r.lent_blocks, r.kv_pending = None, [], None
        r.state = ModelState.PREWARMED

    @staticmethod
    def _engine_call(r: _Resident, fn: Callable) -> Any:
        """`fn(engine)` on the model's engine loop; Refused if the loop does not get to it."""
        loop = r.loop
        if loop is None:
            raise Refused(f"{r.config.name} is not active")
        try:
            return loop.call(fn, ENGINE_CALL_TIMEOUT_S)
        except queue.Empty:
            UniversalWorker._report_stuck(r)
            raise Refused(f"{r.config.name}: engine not responding (a step is stuck)") from None
        except EngineShutDown:
            raise Refused(f"{r.config.name} was deactivated meanwhile") from None

    @staticmethod
    def _report_stuck(r: _Resident) -> None:
        """Once per stuck engine: log whether a step is running and for how long, then every
        thread's stack by name, so that where it hangs (a CUDA call, a lock) is on record."""
        loop = r.loop  # read once: a deactivation may clear it meanwhile
        if r.stuck_reported or loop is None:
            return
        r.stuck_reported = True
        running = loop.step_running_for()
        where = (f"its step has run for {running:.1f} s" if running is not None
                 else "no step is running: the loop is busy with another call")
        log.error("%s: its engine loop (thread %r) did not answer: %s; after %d steps, %d slow."
                  " All threads follow", r.config.name, loop.thread_name, where,
                  loop.num_steps, loop.num_slow_steps)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            stack = "".join(traceback.format_stack(frame))
            print(f"--- thread {names.get(ident, ident)!r}\n{stack}", file=sys.stderr)
        sys.stderr.flush()

    def _require(self, name: str) -> _Resident:
        if name not in self._residents:
            raise Refused(f"{name} is not resident on {self.device}")
        return self._residents[name]

    def _active(self, name: str) -> _Resident:
        r = self._require(name)
        if r.state is not ModelState.ACTIVE:
            raise Refused(f"{name} is {r.state.value}, not active")
        return r

    def _serving(self, name: str) -> _Resident:
        """An active model whose engine serves here: not a follower shard."""
        r = self._active(name)
        if r.loop is None:
            raise Refused(f"{name}: shard {r.shard} here follows instance {r.instance}; its "
                          "driver, rank 0, serves the requests")
        return r
