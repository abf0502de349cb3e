"""The page pool of one device: physical pages created once, slots of virtual addresses.

A slot is a virtual range reserved for one resident model (weights at offset 0, its KV cache
after them). Pages are mapped by one background thread and unmapped by another, each in call
order, so a caller overlaps its own work (copying weights) with mapping. Maps go first: the
driver serialises page-table updates, so an unmap in progress pauses between chunks while any
map is waiting, and evicting one slot does not delay activating another. A map into a slot
waits for that slot's pending unmaps only.

Accounting is exact at all times: every page is in exactly one place — free, in one slot
(mapped, or being mapped), or being unmapped (it becomes free when the unmap has happened).
`check()` asserts it. Refusals (no pages, no slot left) raise `PoolFullError` and change nothing.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from warmserve.memory.backends import PageBackend

UNMAP_CHUNK_PAGES = 64  # an eviction yields to waiting maps between chunks of this many pages
YIELD_EVERY_PAGES = 16  # background threads give up the GIL this often


class PoolError(ValueError):
    """A pool call is invalid (unknown slot, page out of range, mapped twice)."""


class PoolFullError(PoolError):
    """Not enough free pages or slots: a refusal, nothing was changed."""


@dataclass(eq=False)
class Slot:
    name: str
    va: int
    capacity_pages: int
    page_bytes: int
    pages: dict[int, int] = field(default_factory=dict)  # page offset in slot -> page id
    pending_unmaps: list[Future] = field(default_factory=list)
    _view: torch.Tensor | None = None

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_pages * self.page_bytes

    @property
    def num_mapped_pages(self) -> int:
        return len(self.pages)


class PagePool:
    def __init__(self, backend: PageBackend, num_pages: int, max_slots: int = 30) -> None:
        if num_pages < 1:
            raise PoolError(f"num_pages={num_pages} must be >= 1")
        self.backend = backend
        self.page_bytes = backend.page_bytes
        self.max_slots = max_slots
        self._handles = backend.create_pages(num_pages)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low ids come out first
        self._unmapping: set[int] = set()
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._mapper = ThreadPoolExecutor(1, thread_name_prefix="pool-mapper",
                                          initializer=backend.bind_thread)
        self._unmapper = ThreadPoolExecutor(1, thread_name_prefix="pool-unmapper",
                                            initializer=backend.bind_thread)
        self._maps_waiting = 0
        self._maps_idle = threading.Condition(self._lock)

    # --- state ------------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return len(self._handles)

    @property
    def num_free_pages(self) -> int:
        with self._lock:
            return len(self._free)

    def slot(self, name: str) -> Slot:
        if name not in self._slots:
            raise PoolError(f"no slot {name!r}; slots: {', '.join(self._slots) or 'none'}")
        return self._slots[name]

    @property
    def slots(self) -> dict[str, Slot]:
        return dict(self._slots)

    def stats(self) -> dict:
        with self._lock:
            return {
                "pages_total": self.num_pages, "pages_free": len(self._free),
                "pages_unmapping": len(self._unmapping), "page_bytes": self.page_bytes,
                "slots": {s.name: {"pages_mapped": len(s.pages), "capacity_pages":
                                   s.capacity_pages} for s in self._slots.values()},
            }

    def check(self) -> None:
        """Assert exact accounting: each page in exactly one place, none lost."""
        with self._lock:
            places = list(self._free) + list(self._unmapping)
            for slot in self._slots.values():
                places += slot.pages.values()
            assert sorted(places) == list(range(self.num_pages)), "page lost or in two places"

    # --- slots ------------------------------------------------------------------------------

    def create_slot(self, name: str, capacity_bytes: int) -> Slot:
        with self._lock:
            if name in self._slots:
                raise PoolError(f"slot {name!r} exists")
            if len(self._slots) >= self.max_slots:
                raise PoolFullError(f"all {self.max_slots} slots are in use")
            pages = -(-capacity_bytes // self.page_bytes)
            slot = Slot(name, self.backend.reserve(pages * self.page_bytes), pages,
                        self.page_bytes)
            self._slots[name] = slot
            return slot

    def drop_slot(self, name: str) -> Future:
        """Unmap all of a slot's pages (in the background) and free its address range."""
        slot = self.slot(name)
        with self._lock:
            del self._slots[name]
            offsets, pages = list(slot.pages), list(slot.pages.values())
            slot.pages.clear()
            self._unmapping.update(pages)
        return self._unmapper.submit(self._do_drop, slot, offsets, pages)

    def view(self, slot: Slot) -> torch.Tensor:
        """A uint8 tensor over the slot's whole range; touch only mapped pages."""
        if slot._view is None:
            slot._view = self.backend.tensor(slot.va, slot.capacity_bytes)
        return slot._view

    # --- pages ------------------------------------------------------------------------------

    def can_map(self, num_pages: int) -> bool:
        with self._lock:
            return num_pages <= len(self._free)

    def map(self, slot: Slot, offsets: range | list[int]) -> Future:
        """Back the given page offsets of a slot with free pages; the Future completes when
        they are mapped and accessible. Raises PoolFullError (changing nothing) if short."""
        offsets = list(offsets)
        with self._lock:
            self._require_slot(slot)
            bad = [o for o in offsets if not 0 <= o < slot.capacity_pages or o in slot.pages]
            if bad or len(set(offsets)) != len(offsets):
                raise PoolError(f"slot {slot.name!r}: page offsets {bad[:4]} are out of range "
                                f"or already mapped")
            if len(offsets) > len(self._free):
                raise PoolFullError(f"need {len(offsets)} pages, {len(self._free)} are free")
            pages = [self._free.pop() for _ in offsets]
            slot.pages.update(zip(offsets, pages, strict=True))
            waits = [f for f in slot.pending_unmaps if not f.done()]
            self._maps_waiting += 1
        return self._mapper.submit(self._do_map, slot, offsets, pages, waits)

    def unmap(self, slot: Slot, offsets: range | list[int]) -> Future:
        """Take pages out of a slot; they return to the free list once unmapped."""
        offsets = list(offsets)
        with self._lock:
            self._require_slot(slot)
            missing = [o for o in offsets if o not in slot.pages]
            if missing:
                raise PoolError(f"slot {slot.name!r}: page offsets {missing[:4]} are not mapped")
            pages = [slot.pages.pop(o) for o in offsets]
            self._unmapping.update(pages)
            future = self._unmapper.submit(self._do_unmap, slot, offsets, pages)
            slot.pending_unmaps = [f for f in slot.pending_unmaps if not f.done()] + [future]
        return future

    def flush(self) -> None:
        """Wait until every map and unmap asked for so far has happened."""
        self._mapper.submit(lambda: None).result()
        self._unmapper.submit(lambda: None).result()

    def close(self) -> None:
        for name in list(self._slots):
            self.drop_slot(name)
        self._mapper.shutdown(wait=True)
        self._unmapper.shutdown(wait=True)
        self.backend.release_pages(self._handles)
        self._handles = []
        self._free = []

    # --- background work ---------------------------------------------------------------------

    def _do_map(self, slot: Slot, offsets: list[int], pages: list[int],
                waits: list[Future]) -> None:
        try:
            for future in waits:  # the same addresses may still be mapped until these finish
                future.result()
            for i, (offset, page) in enumerate(zip(offsets, pages, strict=True)):
                self.backend.map(slot.va + offset * self.page_bytes, self._handles[page])
                if i % YIELD_EVERY_PAGES == YIELD_EVERY_PAGES - 1:
                    time.sleep(0)  # let the serving thread take the GIL: it launches kernels
            for start, count in _runs(offsets):  # one access call per contiguous run
                self.backend.set_access(slot.va + start * self.page_bytes,
                                        count * self.page_bytes)
        finally:
            with self._lock:
                self._maps_waiting -= 1
                self._maps_idle.notify_all()

    def _do_unmap(self, slot: Slot, offsets: list[int], pages: list[int]) -> None:
        try:
            for start, count in _runs(offsets):
                for first in range(start, start + count, UNMAP_CHUNK_PAGES):
                    with self._lock:  # maps first: wait while any is queued
                        self._maps_idle.wait_for(lambda: self._maps_waiting == 0, timeout=1.0)
                    n = min(UNMAP_CHUNK_PAGES, start + count - first)
                    self.backend.unmap(slot.va + first * self.page_bytes, n * self.page_bytes)
                    time.sleep(0)
        finally:
            with self._lock:
                self._unmapping.difference_update(pages)
                self._free.extend(pages)

    def _do_drop(self, slot: Slot, offsets: list[int], pages: list[int]) -> None:
        self._do_unmap(slot, offsets, pages)
        slot._view = None
        self.backend.free_range(slot.va, slot.capacity_bytes)

    def _require_slot(self, slot: Slot) -> None:
        if self._slots.get(slot.name) is not slot:
            raise PoolError(f"slot {slot.name!r} is not in this pool (dropped?)")


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted offsets as (start, count)."""
    runs: list[tuple[int, int]] = []
    for offset in sorted(offsets):
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((offset, 1))
    return runs
