"""Checkpoints: synthetic shapes, specs, and clear errors for bad sources."""

from __future__ import annotations

import json

import pytest

from warmserve.engine.arch import SYNTH_ARCHS, ModelArch
from warmserve.engine.checkpoint import (
    CheckpointError,
    CheckpointReader,
    hf_tensor_shapes,
    list_checkpoints,
    read_arch,
    resolve_checkpoint,
)


@pytest.mark.parametrize("shape", ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b"])
def test_real_shapes_have_published_sizes(shape):
    billions = {"llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "llama-3-8b": 8.03}
    assert SYNTH_ARCHS[shape].num_parameters() / 1e9 == pytest.approx(billions[shape], rel=0.01)


def test_llama3_8b_block_is_one_page():
    arch = SYNTH_ARCHS["llama-3-8b"]
    assert 16 * arch.kv_bytes_per_token * 2 == 2 << 20  # 16 tokens of bf16 K+V = 2 MiB


def test_tiny_checkpoint_is_a_hf_directory(tiny_checkpoint):
    arch = read_arch(tiny_checkpoint)
    assert arch == SYNTH_ARCHS["tiny"]
    with CheckpointReader(tiny_checkpoint) as reader:
        for name, shape in hf_tensor_shapes(arch).items():
            assert tuple(reader.get(name).shape) == shape
    assert ("synth:tiny", tiny_checkpoint) in list_checkpoints(tiny_checkpoint.parent.parent)


def test_sliding_window_caps_the_context():
    config = SYNTH_ARCHS["tiny"].to_hf_config() | {"sliding_window": 512,
                                                   "max_position_embeddings": 4096}
    assert ModelArch.from_hf_config(config).max_position == 512
    config["use_sliding_window"] = False  # Qwen2 spelling: window present but off
    assert ModelArch.from_hf_config(config).max_position == 4096


def test_hf_config_round_trip():
    for arch in SYNTH_ARCHS.values():
        assert ModelArch.from_hf_config(arch.to_hf_config()) == arch


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:/no/such/dir", "has no config.json"),
        ("gguf:/no/such.gguf", "no file"),
        ("package:surely-not-installed-pkg", "is not installed"),
        ("synth:gpt-9", "unknown synthetic shape"),
        ("ftp:x", "unknown scheme"),
    ],
)
def test_bad_specs(spec, message, tmp_path):
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(spec, tmp_path)


def test_unsupported_architecture_and_missing_tensor(tmp_path, tiny_checkpoint):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        read_arch(tmp_path)
    with CheckpointReader(tiny_checkpoint) as reader, pytest.raises(
            CheckpointError, match="'nope' is missing"):
        reader.get("nope")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="cannot import GGUF"):
        resolve_checkpoint(f"gguf:{bad}", tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
