"""The Llama decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), over a paged KV cache.

Parameter names equal the Hugging Face checkpoint's, one tensor each (no fused QKV), so every
weight can be a view of the memory a checkpoint tensor was copied into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from warmserve.engine.arch import ModelArch
from warmserve.engine.layers.attention import AttentionMetadata, paged_attention
from warmserve.engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from warmserve.engine.layers.norm import RMSNorm
from warmserve.engine.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.num_heads = arch.num_heads // tp_size
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)
        self.head_dim = d
        self.scale = d**-0.5
        bias = arch.attention_bias
        self.q_proj = ColumnParallelLinear(h, arch.num_heads * d, bias, tp_rank, tp_size)
        self.k_proj = ColumnParallelLinear(h, arch.num_kv_heads * d, bias, tp_rank, tp_size)
        self.v_proj = ColumnParallelLinear(h, arch.num_kv_heads * d, bias, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(arch.num_heads * d, h, tp_rank, tp_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                layer_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = paged_attention(q, k, v, layer_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, i, False, tp_rank, tp_size)
        self.up_proj = ColumnParallelLinear(h, i, False, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(i, h, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, tp_rank, tp_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                layer_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, layer_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        for index, layer in enumerate(self.model.layers):
            x = layer(x, positions, self.rotary, kv_cache[:, index], meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] float32
        weight = (
            self.model.embed_tokens.weight if self.arch.tie_word_embeddings
            else self.lm_head.weight
        )
        return F.linear(hidden, weight).float()
