"""Building a model from a checkpoint through the allocation seam.

The engine never allocates weights or KV cache from the framework itself: it asks a
`TensorProvider`. The default provider allocates plain tensors; the universal worker's page pool
provides views into memory that was placed before the engine existed. The model is built on the
meta device and each parameter is assigned the provider's tensor after the checkpoint tensor
was copied into it, so no weight is initialised only to be overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from warmserve.engine.arch import ModelArch
from warmserve.engine.checkpoint import iter_tensors
from warmserve.engine.models import MODEL_CLASSES


class TensorProvider(Protocol):
    """Hands out the memory an engine's tensors live in."""

    device: torch.device

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised storage for one weight tensor."""
        ...

    def kv_cache(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype
                 ) -> torch.Tensor:
        """Uninitialised `[num_blocks, *block_shape]` storage, block-major."""
        ...


class TorchProvider:
    """The default provider: plain framework allocations on one device.

    `poison=True` fills new memory with NaN, so that any read of memory nothing wrote shows up
    (memory handed over by a page pool holds whatever was there before).
    """

    def __init__(self, device: str | torch.device = "cpu", poison: bool = False) -> None:
        self.device = torch.device(device)
        self.poison = poison

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._new(shape, dtype)

    def kv_cache(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype
                 ) -> torch.Tensor:
        return self._new((num_blocks, *block_shape), dtype)

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        return tensor.fill_(float("nan")) if self.poison else tensor


def build_model(arch: ModelArch, checkpoint: Path, dtype: torch.dtype, provider: TensorProvider,
                tp_rank: int = 0, tp_size: int = 1) -> nn.Module:
    """Instantiate on meta, then fill every parameter from the checkpoint via the provider."""
    with torch.device("meta"):
        model = MODEL_CLASSES[arch.architecture](arch, tp_rank, tp_size)
    params = dict(model.named_parameters())
    for name, source in iter_tensors(checkpoint, list(params)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shard = _shard(source, getattr(module, "shard_dim", None), tp_rank, tp_size)
        if shard.shape != params[name].shape:
            raise ValueError(
                f"{checkpoint}: tensor {name} has shape {tuple(shard.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )
        target = provider.weight(name, tuple(shard.shape), dtype)
        target.copy_(shard)
        setattr(module, attr, nn.Parameter(target, requires_grad=False))
    model.rotary.build(provider.device)
    return model.eval()


def _shard(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    if size == 1 or dim is None or tensor.dim() <= dim:
        return tensor
    return tensor.chunk(size, dim=dim)[rank]
