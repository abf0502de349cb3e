"""RMSNorm, computed in float32 like the reference implementation, with a fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from warmserve.engine.layers import triton_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        if triton_ops.usable(x):
            return triton_ops.add_rms_norm(x, None, self.weight, self.eps)
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); on CUDA the residual is updated in place."""
        if triton_ops.usable(x):
            return triton_ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
