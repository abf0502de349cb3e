"""KV-cache reservation on live workers: lend the free KV blocks of running instances beyond
their reservation to the worker's pool (where prewarms need the room), and take them back
when an instance's load rises or its engine has requests waiting for blocks.

The decisions are `policies.lendable_kv_tokens` and `policies.should_reclaim_kv`, as in the
simulator; this module reads the workers' stats and calls their clients.
"""

from __future__ import annotations

import logging
from collections import deque

from warmserve.control.policies import lendable_kv_tokens, should_reclaim_kv
from warmserve.worker.rpc import WorkerGone
from warmserve.worker.worker import Refused

log = logging.getLogger(__name__)


class KvReservation:
    """`capacity`: B, an instance's request capacity. `actions`: the controller's log of
    (time, action, model, worker), appended to."""

    def __init__(self, cluster, capacity: int, actions: deque) -> None:
        self.cluster = cluster
        self.capacity = capacity
        self.actions = actions

    def entries(self):
        """(worker, model, stats entry, blocks it may lend) for every active instance: the
        published reservation keeps total x requests / B blocks free and lends the rest. The
        requests are those running and those waiting in the engine's queue: an engine whose
        requests all wait (for blocks that are lent) is not idle."""
        for worker in self.cluster.workers:
            for model, entry in worker.stats.get("models", {}).items():
                if entry.get("state") == "active" and "blocks_usable" in entry:
                    total = entry["blocks_usable"] + entry["blocks_lent"]
                    lendable = lendable_kv_tokens(total, total - entry["blocks_free"],
                                                  _requests(entry), self.capacity)
                    yield worker, model, entry, lendable

    def lendable_bytes(self) -> dict[str, int]:
        """Bytes each worker's instances may lend, by worker name. A split instance's driver
        lends a block on every rank at once (its shards' blocks are alike), so the room it
        frees counts on each of its workers."""
        out: dict[str, int] = {}
        for worker, model, entry, blocks in self.entries():
            for member in self.cluster.members(worker, model):
                out[member.name] = out.get(member.name, 0) + blocks * entry["block_bytes"]
        return out

    def lend(self, now: float, where: set[str]) -> None:
        """Lend the free KV blocks beyond their reservation of each instance on the workers
        `where` to the pool, in whole pages of whole units of blocks (through its driver,
        for a split instance with a worker in `where`)."""
        for worker, model, entry, lendable in list(self.entries()):
            if where.isdisjoint(m.name for m in self.cluster.members(worker, model)):
                continue
            page = worker.stats["pool"]["page_bytes"]
            unit_pages = entry["blocks_per_unit"] * entry["block_bytes"] // page
            pages = lendable * entry["block_bytes"] // page // unit_pages * unit_pages
            if pages <= 0:
                continue
            try:
                if worker.client.lend(model, pages):
                    self.actions.append((now, "lend", model, worker.name))
                    worker.stats = worker.client.stats()
            except (Refused, WorkerGone) as exc:
                log.info("lend on %s: %s", worker.name, exc)

    def reclaim_for_lenders(self, now: float) -> None:
        """The reclaim check alone, on fresh stats of the workers that lend KV blocks."""
        lenders = [w for w in self.cluster.workers if w.alive and any(
            m.get("blocks_lent") for m in w.stats.get("models", {}).values())]
        for worker in lenders:
            try:
                worker.stats = worker.client.stats()
            except (Refused, WorkerGone) as exc:
                log.info("stats of %s: %s", worker.name, exc)
        if lenders:
            self.reclaim_where_needed(now)

    def reclaim_where_needed(self, now: float) -> None:
        """Take lent pages back when an instance's free blocks fall below its reservation, or
        when requests in its engine wait for blocks, evicting prewarmed models on that worker
        if they hold the memory."""
        for worker, model, entry, _ in list(self.entries()):
            if not should_reclaim_kv(entry["blocks_usable"] + entry["blocks_lent"],
                                     entry["blocks_free"], entry["blocks_lent"],
                                     _requests(entry), entry.get("blocked", 0),
                                     self.capacity):
                continue
            try:
                try:
                    worker.client.reclaim(model)
                except Refused:  # on a split instance, any of its workers may be short
                    for member in self.cluster.members(worker, model):
                        for other, other_entry in member.stats.get("models", {}).items():
                            if other_entry.get("state") == "prewarmed":
                                member.client.evict(other)
                                self.actions.append((now, "evict", other, member.name))
                    worker.client.reclaim(model)
                self.actions.append((now, "reclaim", model, worker.name))
                worker.stats = worker.client.stats()
            except (Refused, WorkerGone) as exc:
                log.info("reclaim on %s: %s", worker.name, exc)


def _requests(entry: dict) -> int:
    """An engine's requests, running and waiting, from its stats entry."""
    return entry["running"] + entry.get("waiting", 0)
