"""Triton paged-attention decode (split over context partitions, flash-decoding style).

One program per (sequence, KV head, partition of PARTITION_TOKENS tokens) computes the
attention of the KV head's query group against its partition, with an online softmax; a small
reduction merges the partitions. The grid depends only on the batch and the block-table width,
and each program reads only blocks below the sequence's length: the launch is CUDA-graph safe.
The table is as wide as the longest context the engine allows, so most partitions of a short
sequence are empty: their programs return at once and the merge, which counts a sequence's
partitions from its length, never reads them.
"""

from __future__ import annotations

import functools

import torch

PARTITION_TOKENS = 256

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports(block_size: int, head_dim: int) -> bool:
    return block_size >= 16 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr, kv_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
        stride_qb, stride_qh,
        stride_blk, stride_kv, stride_tok, stride_head,
        stride_table,
        stride_ob, stride_oh, stride_op,
        stride_mb, stride_mh,
        scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, PART_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        context_len = tl.load(lens_ptr + seq)
        first = part * PART_BLOCKS
        if first * BLOCK_SIZE >= context_len:  # an empty partition: the merge skips it
            return
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK_SIZE)
        heads = kv_head * GROUP + g
        g_mask = g < GROUP
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None], other=0.0)  # [BLOCK_G, D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        last = tl.minimum(first + PART_BLOCKS, tl.cdiv(context_len, BLOCK_SIZE))
        for i in range(PART_BLOCKS):
            blk = first + i
            if blk < last:
                block_id = tl.load(tables_ptr + seq * stride_table + blk).to(tl.int64)
                base = kv_ptr + block_id * stride_blk + kv_head * stride_head
                offs = t[:, None] * stride_tok + d[None, :]
                # Slots past the context may hold anything (NaN too): mask the loads.
                valid = blk * BLOCK_SIZE + t < context_len  # [BLOCK_SIZE]
                k = tl.load(base + offs, mask=valid[:, None], other=0.0)  # [BLOCK_SIZE, D]
                v = tl.load(base + stride_kv + offs, mask=valid[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BS]
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_offs = seq * stride_ob + heads[:, None] * stride_oh + part * stride_op + d[None, :]
        tl.store(out_ptr + o_offs, out, mask=g_mask[:, None])
        ml_offs = seq * stride_mb + heads * stride_mh + part
        tl.store(m_ptr + ml_offs, m_i, mask=g_mask)
        tl.store(l_ptr + ml_offs, l_i, mask=g_mask)


if triton is not None:

    @triton.jit
    def _combine_kernel(partial_ptr, m_ptr, l_ptr, lens_ptr, out_ptr,
                        stride_pb, stride_ph, stride_pp, stride_mb, stride_mh,
                        stride_ob, stride_oh,
                        HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, PART_TOKENS: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        num_parts = tl.cdiv(tl.load(lens_ptr + seq), PART_TOKENS)  # the non-empty ones
        p = tl.arange(0, BLOCK_P)
        d = tl.arange(0, HEAD_DIM)
        p_mask = p < num_parts
        ml = seq * stride_mb + head * stride_mh + p
        m = tl.load(m_ptr + ml, mask=p_mask, other=float("-inf"))
        weights = tl.load(l_ptr + ml, mask=p_mask, other=0.0) * tl.exp(m - tl.max(m, 0))
        weights = tl.where(p_mask, weights, 0.0)  # [BLOCK_P]
        parts = tl.load(partial_ptr + seq * stride_pb + head * stride_ph
                        + p[:, None] * stride_pp + d[None, :], mask=p_mask[:, None], other=0.0)
        out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + d,
                 out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """q [B, H, D]; layer_cache [NB, 2, bs, Hkv, D]; block_tables [B, max_blocks] -> [B, H, D]
    (written into `out` when given)."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    group = num_heads // num_kv_heads
    part_blocks = max(1, PARTITION_TOKENS // block_size)
    num_parts = triton.cdiv(block_tables.shape[1], part_blocks)
    partial = torch.empty(batch, num_heads, num_parts, head_dim, device=q.device,
                          dtype=torch.float32)
    maxes = torch.empty(batch, num_heads, num_parts, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    _decode_kernel[(batch, num_kv_heads, num_parts)](
        q, layer_cache, block_tables, context_lens, partial, maxes, sums,
        q.stride(0), q.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
        layer_cache.stride(3),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        maxes.stride(0), maxes.stride(1),
        scale,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, PART_BLOCKS=part_blocks,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty_like(q) if out is None else out
    _combine_kernel[(batch, num_heads)](
        partial, maxes, sums, context_lens, out,
        partial.stride(0), partial.stride(1), partial.stride(2),
        maxes.stride(0), maxes.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_P=triton.next_power_of_2(num_parts),
        PART_TOKENS=part_blocks * block_size,
    )
    return out
