"""The page pool on the host backend (real remapping of memfd pages): accounting, refusals,
views, and property tests over random operation sequences."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.memory.backends import HostBackend
from warmserve.memory.pool import PagePool, PoolError, PoolFullError
from warmserve.memory.prewarm import prewarm_slot

PAGE = 64 << 10


@pytest.fixture
def pool():
    pool = PagePool(HostBackend(PAGE), 16, max_slots=3)
    yield pool
    pool.close()


def test_map_write_unmap_remap_keeps_physical_pages(pool):
    a = pool.create_slot("a", 4 * PAGE)
    pool.map(a, range(4)).result()
    pool.view(a)[:] = 5
    b = pool.create_slot("b", 16 * PAGE)
    pool.map(b, range(12)).result()
    pool.unmap(a, [1, 2]).result()
    pool.map(b, [12, 13]).result()  # the physical pages a gave back
    assert set(pool.view(b)[12 * PAGE: 14 * PAGE].tolist()) == {5}
    assert pool.view(a)[0].item() == 5 and pool.view(a)[3 * PAGE].item() == 5
    pool.check()


def test_refusals_change_nothing(pool):
    a = pool.create_slot("a", 20 * PAGE)
    with pytest.raises(PoolFullError, match="need 17 pages, 16 are free"):
        pool.map(a, range(17))
    assert pool.num_free_pages == 16 and a.num_mapped_pages == 0
    pool.create_slot("b", PAGE)
    pool.create_slot("c", PAGE)
    with pytest.raises(PoolFullError, match="all 3 slots"):
        pool.create_slot("d", PAGE)
    with pytest.raises(PoolError, match="out of range or already mapped"):
        pool.map(a, [25])
    pool.map(a, [0]).result()
    with pytest.raises(PoolError, match="already mapped"):
        pool.map(a, [0])
    with pytest.raises(PoolError, match="not mapped"):
        pool.unmap(a, [1])
    with pytest.raises(PoolError, match="no slot 'zz'"):
        pool.slot("zz")
    pool.check()


def test_prewarm_copies_and_can_be_cancelled(pool):
    host = torch.arange(10 * PAGE, dtype=torch.int64).to(torch.uint8)
    slot = pool.create_slot("m", 12 * PAGE)
    progress = prewarm_slot(pool, slot, host, chunk_pages=3)
    assert progress.done and torch.equal(pool.view(slot)[: host.numel()], host)
    pool.drop_slot("m").result()
    cancel = threading.Event()
    cancel.set()
    slot = pool.create_slot("m", 12 * PAGE)
    progress = prewarm_slot(pool, slot, host, chunk_pages=3, cancel=cancel)
    assert progress.cancelled and progress.bytes_done == 0
    pool.drop_slot("m").result()  # evicting a cancelled prewarm is safe
    pool.check()
    assert pool.num_free_pages == 16


def test_a_prewarm_that_runs_dry_leaves_nothing_under_way(pool):
    """The pool runs dry part-way (another slot took the pages): prewarm_slot raises only once
    no mapping of its own is still under way (nor, on a GPU, a copy still landing), so the
    caller can drop the slot at once."""
    import time

    pool.map(pool.create_slot("other", 11 * PAGE), range(11)).result()  # 5 pages free
    slot = pool.create_slot("m", 12 * PAGE)
    host = torch.zeros(10 * PAGE, dtype=torch.uint8)
    real_map, futures = pool.backend.map, []

    def slow_map(va, handle):  # the second chunk's pages take a while to map
        if va >= slot.va + 2 * PAGE:
            time.sleep(0.05)
        real_map(va, handle)

    pool.backend.map = slow_map
    pool_map = pool.map

    def recording_map(s, offsets):
        futures.append(pool_map(s, offsets))
        return futures[-1]

    pool.map = recording_map
    with pytest.raises(PoolFullError, match="need 2 pages, 1 are free"):
        prewarm_slot(pool, slot, host, chunk_pages=2)
    assert futures and all(f.done() for f in futures)
    pool.map = pool_map
    pool.drop_slot("m").result()
    pool.check()


OPS = st.lists(st.tuples(st.sampled_from(["create", "map", "unmap", "drop", "prewarm"]),
                         st.integers(0, 3), st.integers(0, 20)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_random_sequences_keep_exact_accounting(ops):
    pool = PagePool(HostBackend(PAGE), 12, max_slots=4)
    try:
        for op, slot_id, n in ops:
            name = f"s{slot_id}"
            slot = pool.slots.get(name)
            try:
                if op == "create" and slot is None:
                    pool.create_slot(name, (n + 1) * PAGE)
                elif op == "map" and slot is not None:
                    free = [o for o in range(slot.capacity_pages) if o not in slot.pages]
                    pool.map(slot, free[: n % 5])
                elif op == "unmap" and slot is not None:
                    pool.unmap(slot, list(slot.pages)[: n % 4])
                elif op == "drop" and slot is not None:
                    pool.drop_slot(name)  # may overtake nothing: the mapper runs in order
                elif op == "prewarm" and slot is not None and not slot.pages:
                    size = min(slot.capacity_bytes, (n % 6 + 1) * PAGE)
                    cancel = threading.Event()
                    if n % 2:
                        cancel.set()
                    prewarm_slot(pool, slot, torch.ones(size, dtype=torch.uint8), 2, cancel)
            except PoolFullError:
                pass
            pool.check()
        for name in list(pool.slots):
            pool.drop_slot(name)
        pool.flush()
        pool.check()
        assert pool.num_free_pages == 12  # nothing leaked
    finally:
        pool.close()
