"""The Llama decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), over a paged KV cache.

Parameter names follow the Hugging Face checkpoint's, except that q/k/v and gate/up are each
stored as one merged weight (one matrix product each); the loader copies every checkpoint
tensor into its rows, so each is still a view of the memory the provider handed out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.engine.arch import ModelArch
from warmserve.engine.layers import triton_ops
from warmserve.engine.layers.attention import AttentionMetadata, paged_attention, write_kv
from warmserve.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from warmserve.engine.layers.norm import RMSNorm
from warmserve.engine.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        if arch.num_kv_heads % tp_size:  # each rank holds whole KV heads, none replicated
            raise ValueError(f"{arch.num_kv_heads} KV heads do not split over "
                             f"tensor_parallel={tp_size}")
        self.num_heads = arch.num_heads // tp_size
        self.num_kv_heads = arch.num_kv_heads // tp_size
        self.head_dim = d
        self.scale = d**-0.5
        parts = (("q_proj", arch.num_heads * d), ("k_proj", arch.num_kv_heads * d),
                 ("v_proj", arch.num_kv_heads * d))
        self.qkv_proj = MergedColumnParallelLinear(h, parts, arch.attention_bias, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(arch.num_heads * d, h, tp_rank, tp_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                layer_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # strided views of one [T, q+2kv]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if triton_ops.usable(x):  # one kernel: RoPE in place and k/v into the cache
            triton_ops.rope_and_cache(q, k, v, positions, rotary.cos_sin, meta.slot_mapping,
                                      layer_cache)
        else:
            q, k = rotary(positions, q, k)
            write_kv(layer_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, layer_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        parts = (("gate_proj", i), ("up_proj", i))
        self.gate_up_proj = MergedColumnParallelLinear(h, parts, False, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(i, h, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if triton_ops.usable(x):
            return self.down_proj(triton_ops.silu_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, tp_rank, tp_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, layer_cache: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, positions, rotary, layer_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, tp_rank, tp_size) for _ in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(ids [T], positions [T], kv_cache, meta) -> hidden [T, H]; logits on demand."""

    def __init__(self, arch: ModelArch, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, tp_rank, tp_size)
        self.rotary = RotaryEmbedding(
            arch.head_dim, arch.max_position, arch.rope_theta, arch.rope_scaling
        )
        if not arch.tie_word_embeddings:
            self.lm_head = ColumnParallelLinear(arch.hidden_size, arch.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        residual = None
        for index, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[:, index], meta)
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] float32
        weight = (
            self.model.embed_tokens.weight if self.arch.tie_word_embeddings
            else self.lm_head.weight
        )
        return F.linear(hidden, weight).float()
