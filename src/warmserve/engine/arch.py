"""The Llama-family architecture record and the named synthetic shapes.

`ModelArch` holds just what the engine needs from a Hugging Face `config.json`; it covers Llama 2
and 3, Mistral, Qwen2 (attention biases) and SmolLM2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `kind` is 'default', 'linear' or 'llama3'."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelArch:
    """Dimensions of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in elements (multiply by the dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        """Read a Hugging Face config.json mapping (transformers 4.x and 5.x spellings)."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {archs[0]!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        max_position = cfg.get("max_position_embeddings", 4096)
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", True) and window < max_position:
            # No sliding-window attention here: up to the window it equals full attention,
            # so the usable context stops there.
            max_position = window
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            max_position=max_position,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=_parse_rope_scaling(rope),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", archs[0] == "Qwen2ForCausalLM"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=archs[0],
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json mapping that transformers reads back as this architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.kind, "rope_theta": self.rope_theta}
        if self.rope_scaling.kind != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.kind == "llama3":
            rope |= {
                "low_freq_factor": self.rope_scaling.low_freq_factor,
                "high_freq_factor": self.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position,
            }
        return {
            "architectures": [self.architecture],
            "model_type": self.architecture.removesuffix("ForCausalLM").lower(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.rope_scaling.kind != "default" else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {"num_parameters": self.num_parameters()}


def _parse_rope_scaling(rope: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    return RopeScaling(
        kind=kind,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
    )


_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

# Real shapes of the models the paper and our benchmarks use; weights are random.
SYNTH_ARCHS: dict[str, ModelArch] = {
    "tiny": ModelArch(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position=2048, bos_token_id=256, eos_token_ids=(257,),
    ),
    "llama-2-7b": ModelArch(32000, 4096, 11008, 32, 32, 32, 128, 4096, 1e-5),
    "llama-2-13b": ModelArch(32000, 5120, 13824, 40, 40, 40, 128, 4096, 1e-5),
    "llama-2-70b": ModelArch(32000, 8192, 28672, 80, 64, 8, 128, 4096, 1e-5),
    "llama-3-8b": ModelArch(
        128256, 4096, 14336, 32, 32, 8, 128, 8192, 1e-5, 500000.0, _LLAMA3_ROPE,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
}


def weight_bytes(arch: ModelArch, dtype_bytes: int = 2) -> int:
    return arch.num_parameters() * dtype_bytes


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
