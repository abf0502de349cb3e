"""Where a model's tensors live inside a slot (and, byte for byte, in the host cache).

Weights are packed from offset 0 in the engine's parameter order, each 256-byte aligned; the KV
cache starts at the next page boundary, block-major, so that a group of blocks is a whole number
of pages. The host cache keeps the weights in exactly this layout: prewarming a slot is then a
straight copy of one contiguous buffer, chunk by chunk, while the pages of the next chunk map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from warmserve.engine.arch import ModelArch
from warmserve.engine.models import MODEL_CLASSES
from warmserve.engine.parallel import Shard

ALIGN = 256


@dataclass(frozen=True)
class TensorPlacement:
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class SlotLayout:
    tensors: tuple[TensorPlacement, ...]
    weight_bytes: int
    page_bytes: int
    kv_offset: int  # page-aligned
    block_bytes: int
    block_shape: tuple[int, ...]  # [L, 2, block_size, Hkv, D]
    blocks_per_unit: int  # blocks per lending unit (a whole number of pages)
    num_blocks: int  # including the engine's scratch block
    dtype: torch.dtype
    shard: Shard = field(default_factory=Shard)  # the part of a split model laid out

    @property
    def weight_pages(self) -> int:
        return -(-self.weight_bytes // self.page_bytes)

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def capacity_bytes(self) -> int:
        end = self.kv_offset + self.kv_bytes
        return -(-end // self.page_bytes) * self.page_bytes

    def kv_pages(self, first_block: int, num_blocks: int) -> range:
        """Page offsets (in the slot) that hold blocks [first, first + n)."""
        start = self.kv_offset + first_block * self.block_bytes
        end = start + num_blocks * self.block_bytes
        return range(start // self.page_bytes, -(-end // self.page_bytes))

    def placement(self, name: str) -> TensorPlacement:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(f"no tensor {name!r} in the layout")


def plan_layout(arch: ModelArch, dtype: torch.dtype, page_bytes: int, block_size: int,
                kv_bytes: int, shard: Shard | None = None) -> SlotLayout:
    """Lay out one model's weights and up to `kv_bytes` of KV cache; with `shard`, those of
    that part of a tensor-parallel model (its slices of the weights, its KV heads)."""
    shard = shard or Shard()
    with torch.device("meta"):
        model = MODEL_CLASSES[arch.architecture](arch, shard.rank, shard.size)
    tensors, offset = [], 0
    for name, param in model.named_parameters():
        tensors.append(TensorPlacement(name, offset, tuple(param.shape), dtype))
        offset += -(-math.prod(param.shape) * dtype.itemsize // ALIGN) * ALIGN
    weight_bytes = offset
    kv_offset = -(-weight_bytes // page_bytes) * page_bytes
    block_shape = (arch.num_layers, 2, block_size, arch.num_kv_heads // shard.size,
                   arch.head_dim)
    block_bytes = math.prod(block_shape) * dtype.itemsize
    # Lending moves whole units (blocks that fill whole pages); the cache itself is any number
    # of blocks, so a block size that divides pages badly only makes lending coarse.
    blocks_per_unit = math.lcm(block_bytes, page_bytes) // block_bytes
    num_blocks = max(2, kv_bytes // block_bytes)
    return SlotLayout(tuple(tensors), weight_bytes, page_bytes, kv_offset, block_bytes,
                      block_shape, blocks_per_unit, num_blocks, dtype, shard)


class LayoutProvider:
    """The engine's allocation seam over a laid-out byte buffer (a slot, or the host cache).

    `filled=True` says the weights are already in place (a prewarmed slot): the loader then
    skips the copy, and activation copies nothing.
    """

    def __init__(self, base: torch.Tensor, layout: SlotLayout, filled: bool = False) -> None:
        self.base = base  # uint8, the whole slot (or at least the weights)
        self.layout = layout
        self.filled = filled
        self.device = base.device

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        p = self.layout.placement(name)
        if p.shape != tuple(shape) or p.dtype != dtype:
            raise ValueError(f"{name}: layout has {p.shape} {p.dtype}, asked {shape} {dtype}")
        return self.base[p.offset: p.offset + p.nbytes].view(dtype).view(shape)

    def kv_cache(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype
                 ) -> torch.Tensor:
        layout = self.layout
        if tuple(block_shape) != layout.block_shape or num_blocks > layout.num_blocks:
            raise ValueError(f"KV cache of {num_blocks} x {block_shape} does not fit the layout "
                             f"({layout.num_blocks} x {layout.block_shape})")
        start = layout.kv_offset
        region = self.base[start: start + num_blocks * layout.block_bytes]
        return region.view(dtype).view(num_blocks, *block_shape)
