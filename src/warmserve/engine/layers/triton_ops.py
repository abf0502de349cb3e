"""Fused Triton kernels for the per-token work around the matrix products (CUDA only).

At decode batch sizes each PyTorch elementwise op is its own launch of a few microseconds, and
a Llama layer has dozens of them: fused, a layer has one kernel for each of (residual add +
RMSNorm), (RoPE on q and k + writing k and v into the cache), and (SiLU * up). Each has a
PyTorch twin in the layer modules, which the CPU runs and the tests compare against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def usable(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out,
                             n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
            tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
            x = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)  # rounded sum
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = w * (xf * rstd).to(x.dtype)
        tl.store(out_ptr + row * stride_out + cols, y, mask=mask)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, slot_ptr, cache_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_cs, stride_blk, stride_kv, stride_tok, stride_head,
                           num_q_heads, block_size, HALF: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        pos = tl.load(pos_ptr + token)
        i = tl.arange(0, HALF)
        cos = tl.load(cos_sin_ptr + pos * stride_cs + i)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i)
        if head < num_q_heads:
            base = q_ptr + token * stride_qt + head * stride_qh
        else:
            base = k_ptr + token * stride_kt + (head - num_q_heads) * stride_kh
        x1 = tl.load(base + i).to(tl.float32)
        x2 = tl.load(base + HALF + i).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        tl.store(base + i, y1)
        tl.store(base + HALF + i, y2)
        if head >= num_q_heads:
            kv_head = head - num_q_heads
            slot = tl.load(slot_ptr + token)
            dst = (cache_ptr + (slot // block_size) * stride_blk + (slot % block_size) * stride_tok
                   + kv_head * stride_head)
            tl.store(dst + i, y1)
            tl.store(dst + HALF + i, y2)
            v_src = v_ptr + token * stride_vt + kv_head * stride_vh
            tl.store(dst + stride_kv + i, tl.load(v_src + i))
            tl.store(dst + stride_kv + HALF + i, tl.load(v_src + HALF + i))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + width + cols, mask=mask, other=0.0)
        silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)
        tl.store(out_ptr + row * stride_out + cols, silu * u, mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """RMSNorm(x + residual) * weight; `residual` is updated in place to x + residual."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), cols, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(cols),
    )
    return out


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, slot_mapping: torch.Tensor, layer_cache: torch.Tensor
                   ) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place; store k and v [T, Hkv, D] at their slots
    of layer_cache [NB, 2, bs, Hkv, D]. cos_sin [P, D] holds cos in its first half."""
    tokens, num_heads, head_dim = q.shape
    _rope_cache_kernel[(tokens, num_heads + k.shape[1])](
        q, k, v, positions, cos_sin, slot_mapping, layer_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
        layer_cache.stride(3), num_heads, layer_cache.shape[2], HALF=head_dim // 2,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] = [gate | up] -> [T, I]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, device=gate_up.device, dtype=gate_up.dtype)
    _silu_mul_kernel[(rows, triton.cdiv(width, 1024))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=1024)
    return out
