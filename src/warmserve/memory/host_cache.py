"""Pinned host memory holding models' weights in slot layout, least recently used out first.

Pinning costs ~0.6 s per GiB here, so buffers are pinned once, when a model enters the cache,
and reused; a prewarm then streams a buffer into a slot at PCIe speed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from warmserve.engine.arch import ModelArch
from warmserve.engine.loader import build_model
from warmserve.memory.layout import LayoutProvider, SlotLayout

log = logging.getLogger(__name__)


class HostCacheFullError(ValueError):
    """A model's weights do not fit the cache even when it is empty."""


class HostWeightCache:
    def __init__(self, capacity_bytes: int, pin: bool | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(buf.numel() for buf in self._entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def load(self, key: str, checkpoint: Path, arch: ModelArch, layout: SlotLayout,
             progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
        """The weights of `key` in layout order (a shard's, for a shard's layout), read from
        disk once and pinned.
        `progress(key, bytes_done, bytes_total)` is called as tensors arrive."""
        cached = self.get(key)
        if cached is not None:
            return cached
        size = layout.weight_bytes
        if size > self.capacity_bytes:
            raise HostCacheFullError(f"{key}: {size >> 20} MiB of weights exceed the host cache "
                                     f"({self.capacity_bytes >> 20} MiB)")
        while self.used_bytes + size > self.capacity_bytes:
            evicted, _ = self._entries.popitem(last=False)
            log.info("host cache: evicted %s", evicted)
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        provider = _CountingProvider(buffer, layout, key, progress)
        build_model(arch, checkpoint, layout.dtype, provider, layout.shard)
        if progress:
            progress(key, size, size)
        self._entries[key] = buffer
        return buffer

    def evict(self, key: str) -> None:
        self._entries.pop(key, None)


class _CountingProvider(LayoutProvider):
    """A layout provider that reports bytes handed out (each is filled right after)."""

    def __init__(self, base: torch.Tensor, layout: SlotLayout, key: str,
                 progress: Callable[[str, int, int], None] | None) -> None:
        super().__init__(base, layout)
        self._key, self._progress, self._done = key, progress, 0

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = super().weight(name, shape, dtype)
        if self._progress:
            self._progress(self._key, self._done, self.layout.weight_bytes)
        self._done += tensor.numel() * tensor.element_size()
        return tensor
