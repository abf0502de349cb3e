"""Paged attention over a block-major KV cache.

Cache layout (one tensor per instance): `[num_blocks, num_layers, 2, block_size, Hkv, D]`, so
all layers' K and V of one block are contiguous and a block is a whole number of pool pages.
A layer sees the strided view `cache[:, layer]` = `[num_blocks, 2, block_size, Hkv, D]`.

A step's tokens are laid out decodes first (one token per sequence), then prefill chunks.
Decodes use a Triton kernel on CUDA (graph-capturable: it reads only the blocks a sequence
holds) and a gather + SDPA reference elsewhere; prefill chunks use SDPA, reading earlier chunks
back from the cache when a prompt was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from warmserve.engine.layers import triton_decode

# Prefill chunks' SDPA backends, best first. Not cuDNN's: on the H100 (torch 2.11) SDPA picked
# it first, and it builds a plan on the host for every new sequence length, 4.7 ms a call
# (docs/engine.md): prompts come in every length, so nearly every prefill paid for one.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PrefillSpan:
    """One sequence's prefill chunk within the step's flat token list."""

    query_start: int
    query_len: int
    num_cached: int  # tokens of this sequence already in the cache before this chunk
    block_table: torch.Tensor  # [num_blocks] int64, covering num_cached + query_len tokens


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32 (padding: any block)
    decode_context_lens: torch.Tensor  # [num_decodes] int32, including the new token
    prefills: list[PrefillSpan]


def write_kv(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's new K/V ([T, Hkv, D] each) at their slots."""
    block_size = layer_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    layer_cache[blocks, 0, offsets] = k
    layer_cache[blocks, 1, offsets] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]; the step's k/v are already in the cache."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        if q.is_cuda and triton_decode.available() and triton_decode.supports(
            layer_cache.shape[2], q.shape[-1]
        ):
            triton_decode.paged_decode(
                q[:nd], layer_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
                out=out[:nd],
            )
        else:
            out[:nd] = decode_reference(
                q[:nd], layer_cache, meta.decode_block_tables, meta.decode_context_lens, scale
            )
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        out[rows] = _prefill(q[rows], k[rows], v[rows], layer_cache, span, scale)
    return out


def decode_reference(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Gather + SDPA decode: q [B, H, D] -> [B, H, D]."""
    num_blocks = int(context_lens.max()) + layer_cache.shape[2] - 1
    num_blocks //= layer_cache.shape[2]
    tables = block_tables[:, :num_blocks].long()
    kv = layer_cache[tables]  # [B, nb, 2, bs, Hkv, D]
    b, nb, _, bs, hkv, d = kv.shape
    keys = kv[:, :, 0].reshape(b, nb * bs, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
    values = kv[:, :, 1].reshape(b, nb * bs, hkv, d).transpose(1, 2)
    positions = torch.arange(nb * bs, device=q.device)
    mask = positions[None, :] < context_lens[:, None]  # [B, S]
    # Slots past the context may hold anything (NaN too): 0 * NaN would leak through softmax.
    keys = keys.masked_fill(~mask[:, None, :, None], 0.0)
    values = values.masked_fill(~mask[:, None, :, None], 0.0)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=True,
    )  # [B, H, 1, D]
    return out.squeeze(2)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor,
             span: PrefillSpan, scale: float) -> torch.Tensor:
    # q [S, H, D]; k/v [S, Hkv, D]
    mask = None
    if span.num_cached:
        total = span.num_cached + span.query_len
        kv = layer_cache[span.block_table]  # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].flatten(0, 1)[:total]  # [total, Hkv, D]
        v = kv[:, 1].flatten(0, 1)[:total]
        query_pos = torch.arange(span.num_cached, total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]  # [S, total]
    group = q.shape[1] // k.shape[1]
    if group > 1:  # expanded heads keep SDPA on its flash kernel (enable_gqa may not)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # 4-D [1, H, S, D] inputs: SDPA's flash and memory-efficient kernels take no other rank.
    with sdpa_kernel(PREFILL_BACKENDS):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=scale,
        )
    return out[0].transpose(0, 1)  # [S, H, D]
