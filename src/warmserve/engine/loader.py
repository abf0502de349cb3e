"""Building a model from a checkpoint through the allocation seam.

The engine never allocates weights or KV cache from the framework itself: it asks a
`TensorProvider`. The default provider allocates plain tensors; the universal worker's page pool
provides views into memory that was placed before the engine existed. The model is built on the
meta device and each parameter is assigned the provider's tensor after the checkpoint tensor
was copied into it, so no weight is initialised only to be overwritten.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from warmserve.engine.arch import ModelArch
from warmserve.engine.checkpoint import CheckpointReader
from warmserve.engine.layers.linear import RowParallelLinear
from warmserve.engine.models import MODEL_CLASSES
from warmserve.engine.parallel import Shard, TensorParallel


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

    # A provider may set `filled = True`: its weights already hold the checkpoint's values.


def cuda_device_count() -> int:
    """CUDA devices this process can use: 0 without CUDA (a CPU build of torch, say)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def checked_device(text: str | torch.device) -> torch.device:
    """`text` as a device this process can use (cpu, or a CUDA device that exists); a
    ValueError that names it otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device {str(text)!r}: expected cpu or cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {str(text)!r}: expected cpu or cuda[:N]")
    count = cuda_device_count()
    if count == 0:
        raise ValueError(f"device {str(text)!r}: no CUDA device here (this torch build or "
                         f"machine has none)")
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(text)!r}: this machine has {count} CUDA device(s)")
    return device


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
                shard: Shard | None = None) -> nn.Module:
    """Instantiate on meta, then fill every parameter from the checkpoint via the provider.
    With `shard`, that part of a tensor-parallel model: its rows of the column-parallel
    layers, its columns of the row-parallel ones, the rest whole (it runs once `connect`ed
    to its instance's group)."""
    shard = shard or Shard()
    with torch.device("meta"):
        model = MODEL_CLASSES[arch.architecture](arch, shard.rank, shard.size)
    filled = getattr(provider, "filled", False)  # weights already in place: copy nothing
    with contextlib.nullcontext() if filled else CheckpointReader(checkpoint) as reader:
        for name, param in list(model.named_parameters()):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            target = provider.weight(name, tuple(param.shape), dtype)
            offset = 0
            for source_name, rows in [] if filled else _sources(module_name, attr, module, param):
                shard = _shard(reader.get(source_name), module)
                expected = (rows, *param.shape[1:])
                if tuple(shard.shape) != expected:
                    raise ValueError(f"{checkpoint}: tensor {source_name} has shape "
                                     f"{tuple(shard.shape)}, expected {expected}")
                target[offset: offset + rows].copy_(shard)
                offset += rows
            setattr(module, attr, nn.Parameter(target, requires_grad=False))
    model.rotary.build(provider.device)
    return model.eval()


def connect(model: nn.Module, tp: TensorParallel | None) -> None:
    """Let a shard's row-parallel layers sum over `tp`'s devices (None: a model split no
    more, whose layers then have nothing to sum)."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            module.reduce = tp.all_reduce if tp is not None else None


def _sources(module_name: str, attr: str, module: nn.Module, param: torch.Tensor
             ) -> list[tuple[str, int]]:
    """Checkpoint tensors that fill a parameter, with their rows: one, or a merged layer's parts."""
    parts = getattr(module, "parts", None)
    if parts is None:
        return [(f"{module_name}.{attr}", param.shape[0])]
    parent = module_name.rpartition(".")[0]
    return [(f"{parent}.{part}.{attr}", rows) for part, rows in parts]


def _shard(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The module's part of a checkpoint tensor: a tensor-parallel layer's rank's slice
    along its `shard_dim` (a bias has no columns to split), anything else whole."""
    dim, size = getattr(module, "shard_dim", None), getattr(module, "tp_size", 1)
    if size == 1 or dim is None or tensor.dim() <= dim:
        return tensor
    return tensor.chunk(size, dim=dim)[module.tp_rank]
