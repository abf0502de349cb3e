"""Linear layers shaped for tensor parallelism (Megatron column/row split).

A column-parallel layer holds `out_features / tp_size` rows of the weight; a row-parallel layer
holds `in_features / tp_size` columns and sums partial outputs across ranks. `shard_dim` tells
the loader which checkpoint dimension to slice for this rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ColumnParallelLinear(nn.Module):
    shard_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"out_features={out_features} not divisible by tp_size={tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(
            torch.empty(out_features // tp_size, in_features), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features // tp_size), requires_grad=False)
            if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel projections of one input stored as one weight `[sum(rows), in]`.

    One matrix product instead of several (at decode, one launch that streams all the rows).
    `parts` names each checkpoint projection and its rows on this rank; the loader copies each
    checkpoint tensor into its row range, so every part is still a view of provider memory.
    """

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        for name, rows in parts:
            if rows % tp_size:
                raise ValueError(f"{name}: {rows} rows not divisible by tp_size={tp_size}")
        super().__init__(in_features, sum(rows for _, rows in parts), bias, tp_rank, tp_size)
        self.parts = tuple((name, rows // tp_size) for name, rows in parts)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split([rows for _, rows in self.parts], dim=-1)


class RowParallelLinear(nn.Module):
    shard_dim = 1

    def __init__(self, in_features: int, out_features: int, tp_rank: int = 0, tp_size: int = 1
                 ) -> None:
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"in_features={in_features} not divisible by tp_size={tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        # sums a partial output over the ranks, in place (`connect` sets it)
        self.reduce: Callable[[torch.Tensor], None] | None = None
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // tp_size), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.tp_size > 1:
            self.reduce(out)
        return out
