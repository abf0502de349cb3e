"""Streaming weights from the host cache into a slot.

Two orders: `pipeline=True` (the default) copies chunk k while the pages of chunks k+1 and k+2
are mapped on the pool's background thread, so a copy waits only for its own pages;
`pipeline=False` maps all pages first (one job), then copies. With 32 MiB pages the pipeline
loads a Llama-3-8B at 99.9% of the pinned-copy rate on the H100 (docs/memory.md).
A prewarm can be cancelled between chunks; it then stops copying, waits for its copies to land,
and leaves the slot to be dropped. One that fails (the pool ran dry) waits the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass

import torch

from warmserve.memory.pool import PagePool, Slot

LOOKAHEAD = 2


@dataclass
class PrewarmProgress:
    bytes_done: int = 0
    bytes_total: int = 0
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.bytes_done >= self.bytes_total and not self.cancelled


def prewarm_slot(pool: PagePool, slot: Slot, host: torch.Tensor, chunk_pages: int = 8,
                 cancel: threading.Event | None = None,
                 stream: torch.cuda.Stream | None = None,
                 pipeline: bool = True,
                 progress: PrewarmProgress | None = None) -> PrewarmProgress:
    """Map the slot's weight pages and copy `host` (uint8, laid out) into them; `progress`
    (updated in place, chunk by chunk) lets another thread report how far it got."""
    page = pool.page_bytes
    total_pages = -(-host.numel() // page)
    if not pipeline:
        pool.map(slot, [p for p in range(total_pages) if p not in slot.pages]).result()
    chunks = [range(s, min(s + chunk_pages, total_pages))
              for s in range(0, total_pages, chunk_pages)]
    progress = progress or PrewarmProgress()
    progress.bytes_total = host.numel()
    view = pool.view(slot)
    pending: deque = deque()
    submitted = 0
    while submitted < min(LOOKAHEAD, len(chunks)):
        pending.append(pool.map(slot, [p for p in chunks[submitted] if p not in slot.pages]))
        submitted += 1
    on_device = view.is_cuda
    ctx = (torch.cuda.stream(stream) if on_device and stream is not None
           else contextlib.nullcontext())
    try:
        with ctx:
            for chunk in chunks:
                pending.popleft().result()  # this chunk's pages are mapped and accessible
                if cancel is not None and cancel.is_set():
                    progress.cancelled = True
                    break
                if submitted < len(chunks):
                    pending.append(pool.map(slot, [p for p in chunks[submitted]
                                                   if p not in slot.pages]))
                    submitted += 1
                start, end = chunk.start * page, min(chunk.stop * page, host.numel())
                view[start:end].copy_(host[start:end], non_blocking=on_device)
                progress.bytes_done = end
    finally:
        # Also when a map fails (the pool ran dry): the caller drops the slot next, and
        # unmapping pages that a copy still writes, or that are still being mapped, faults
        # the GPU context of the whole process (seen live: every engine step on that GPU
        # then failed with "unspecified launch failure").
        for future in pending:
            with contextlib.suppress(Exception):
                future.result()
        if on_device:
            (stream or torch.cuda.current_stream()).synchronize()
    return progress
