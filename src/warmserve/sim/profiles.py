"""Cost profiles: what a model costs on a device, as data files with their sources."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path

import yaml


@dataclass(frozen=True)
class TpScaling:
    """How a model's step costs follow from memory traffic and GPUs. A decode step = a fixed
    part (launches, sampling: what the profile's step costs beyond reading the weights at
    `hbm_bytes_per_s`) + the weight reads, split over the GPUs, + `allreduce_s` when there are
    several, + the running sequences' KV-cache reads (their bytes on one GPU at
    `hbm_bytes_per_s`, times `kv_read_overhead`). The work that grows with tokens (prefill,
    and each further sequence of a decode batch) divides over the GPUs at `efficiency` per
    doubling (MuxServe's meshes)."""
    hbm_bytes_per_s: float = 3.0e12
    allreduce_s: float = 0.0
    efficiency: float = 1.0
    kv_read_overhead: float = 1.0


def prefill_steps(tokens: int, step_tokens: int, packed: bool) -> float:
    """Engine steps a prompt's prefill takes: whole steps alone; its tokens' share of steps
    when it queues behind other prompts, which the engine packs up to `step_tokens` a step."""
    return tokens / step_tokens if packed else -(-tokens // step_tokens)


@dataclass(frozen=True)
class ModelCost:
    name: str
    tp: int
    weight_bytes: int
    kv_bytes_per_token: int  # all layers, K and V, whole model (split over tp GPUs)
    decode_base_s: float  # one decode step at batch 1
    decode_per_seq_s: float  # each further sequence in the batch
    prefill_s_per_token: float
    prefill_base_s: float
    scaling: TpScaling = field(default_factory=lambda: TpScaling())

    @property
    def weight_bytes_per_gpu(self) -> int:
        return self.weight_bytes // self.tp

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + tokens * self.prefill_s_per_token

    @cached_property
    def decode_s_per_context_token(self) -> float:
        """What each token of the running sequences' contexts adds to a decode step: its KV
        cache read (the model's heads are split over its GPUs, so are the reads)."""
        sc = self.scaling
        return self.kv_bytes_per_token / self.tp / sc.hbm_bytes_per_s * sc.kv_read_overhead

    def decode_step_s(self, batch: int, context_tokens: float = 0.0) -> float:
        """One decode step of `batch` sequences holding `context_tokens` tokens together."""
        return (self.decode_base_s + (batch - 1 if batch > 1 else 0) * self.decode_per_seq_s
                + context_tokens * self.decode_s_per_context_token)

    def batch_step_s(self, batch: int, prompt_tokens, output_tokens):
        """One decode step of `batch` requests like this one (scalars or arrays of lengths),
        each holding its prompt and, on average over its decode, half its output."""
        return self.decode_step_s(batch, batch * (prompt_tokens + output_tokens / 2))

    # Prefill and decode share an engine's steps (chunked prefill, decodes first). A step that
    # carries a prompt's chunk also carries one token of every running sequence, and those
    # cost their per-sequence work only: the weights are read once for the whole step
    # (measured with our engine: profiles/h100.yaml [mix]).

    def mixed_prefill_s(self, alone_s: float, running: int, context_tokens: float,
                        steps: float) -> float:
        """A prompt's prefill (`alone_s` = prefill_s of its tokens, on an idle engine) while
        `running` sequences holding `context_tokens` decode beside it."""
        riding = running * self.decode_per_seq_s + context_tokens * self.decode_s_per_context_token
        return alone_s + riding * steps

    def decode_stall_s(self, alone_s: float, steps: float) -> float:
        """How much a prompt's prefill (`alone_s` on an idle engine) delays the sequences
        decoding beside it: its steps cost its prefill instead of the decode steps' fixed
        part."""
        stall = alone_s - steps * self.decode_base_s
        return stall if stall > 0.0 else 0.0

    def tpot_s(self, batch: int, context_tokens: float, stall_rate: float, step_tokens: int
               ) -> float:
        """Time per output token at `batch` (holding `context_tokens`) when prefills take
        `stall_rate` of the engine's time (seconds of stall per second); at most a decode step
        plus a full prefill chunk, what every step costs while prompts queue."""
        step = self.decode_step_s(batch, context_tokens)
        if stall_rate <= 0.0:
            return step
        chunk = self._chunk_stall_s.get(step_tokens)
        if chunk is None:  # asked on every request, for one or two chunk sizes
            chunk = self._chunk_stall_s[step_tokens] = self.decode_stall_s(
                self.prefill_s(step_tokens), 1)
        worst = step + chunk
        return worst if stall_rate >= 1.0 else min(step / (1.0 - stall_rate), worst)

    @cached_property
    def _chunk_stall_s(self) -> dict[int, float]:
        """decode_stall_s of one step carrying a full prefill chunk, by chunk size."""
        return {}

    def on_gpus(self, tp: int) -> ModelCost:
        """The same model over another number of GPUs (see TpScaling)."""
        if tp < 1:
            raise ValueError(f"{self.name}: tensor-parallel degree must be >= 1, got {tp}")
        if tp == self.tp:
            return self
        sc = self.scaling
        reads = self.weight_bytes_per_gpu / sc.hbm_bytes_per_s
        fixed = max(0.0, self.decode_base_s - reads - (sc.allreduce_s if self.tp > 1 else 0.0))
        per_token = self.tp / tp / sc.efficiency ** math.log2(tp / self.tp)
        return replace(
            self, tp=tp,
            decode_base_s=fixed + self.weight_bytes / tp / sc.hbm_bytes_per_s
            + (sc.allreduce_s if tp > 1 else 0.0),
            decode_per_seq_s=self.decode_per_seq_s * per_token,
            prefill_s_per_token=self.prefill_s_per_token * per_token)


@dataclass(frozen=True)
class DeviceProfile:
    device: str
    memory_bytes: int
    pool_fraction: float
    h2d_bytes_per_s: float
    ssd_bytes_per_s: float
    engine_init_s: float
    activation_s: float  # a prewarmed model (its runner built) -> a serving instance
    evict_s: float
    models: dict[str, ModelCost]
    runner_build_s: float = 0.0  # a model's runner (CUDA graphs) in a universal worker

    @property
    def pool_bytes(self) -> int:
        return int(self.memory_bytes * self.pool_fraction)

    def model(self, shape: str) -> ModelCost:
        if shape not in self.models:
            raise KeyError(f"no cost profile for model shape {shape!r}; known: "
                           f"{', '.join(self.models)}")
        return self.models[shape]


def service_time_fn(costs: list[ModelCost], batch: int):
    """Per-model request duration at a given batch: prefill plus decode of every output token
    (in a batch of requests like it, each holding its prompt and half its output)."""

    def service_time(model, input_tokens, output_tokens):
        cost = costs[model]
        return (cost.prefill_s(input_tokens)
                + output_tokens * cost.batch_step_s(batch, input_tokens, output_tokens))

    return service_time


class ProfileError(ValueError):
    """A cost profile cannot be found or read; the message names the file and the key."""


def shipped_profiles() -> list[str]:
    folder = resources.files("warmserve.sim").joinpath("profiles")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def parse_override(text: str) -> tuple[str, float] | None:
    """`KEY=NUMBER` (a load_profile override) as (key, number); None where it is not that."""
    key, sep, value = text.partition("=")
    try:
        return (key.strip(), float(value)) if sep and key.strip() else None
    except ValueError:
        return None


def load_profile(name_or_path: str = "h100", overrides: dict[str, float] | None = None
                 ) -> DeviceProfile:
    """A shipped profile by name (`h100`), or a YAML file like it. `overrides` replace
    top-level values of the file (`engine_init_s`, `h2d_gbps`, ...) before it is read."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_profiles()
        if name_or_path not in shipped:
            raise ProfileError(f"cost profile {name_or_path!r} is neither a file nor one of "
                               f"{', '.join(shipped)}")
        path = Path(str(resources.files("warmserve.sim").joinpath("profiles",
                                                                  f"{name_or_path}.yaml")))
    try:
        data = yaml.safe_load(path.read_text())
        for key, value in (overrides or {}).items():
            if not isinstance(data, dict) or key not in data or key in ("device", "models"):
                raise ValueError(f"no top-level cost {key!r} to override")
            data[key] = value
        return _profile_from(data)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    except KeyError as exc:
        raise ProfileError(f"{path}: missing key {exc.args[0]}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProfileError(f"{path}: {exc}") from None


def _profile_from(data: dict) -> DeviceProfile:
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError("a profile is a mapping of keys (device, memory_gb, models, ...), its "
                         "models a mapping of shape names to costs")
    gb = 1e9
    tp = data.get("tensor_parallel", {})
    scaling = TpScaling(_number(tp, "hbm_gbps", "tensor_parallel.", 3000, positive=True) * gb,
                        _number(tp, "allreduce_ms", "tensor_parallel.", 0.0) / 1e3,
                        _number(tp, "efficiency", "tensor_parallel.", 1.0, positive=True),
                        _number(data, "kv_read_overhead", "", 1.0, positive=True))
    models = {}
    for name, m in data["models"].items():
        where = f"models.{name}."
        if not isinstance(m, dict):
            raise ValueError(f"{where[:-1]} is not a mapping of costs")
        tp_degree = _number(m, "tp", where, positive=True)
        if tp_degree != int(tp_degree):
            raise ValueError(f"{where}tp = {m['tp']} is not a whole number of GPUs")
        models[name] = ModelCost(
            name, int(tp_degree), int(_number(m, "weight_gb", where, positive=True) * gb),
            int(_number(m, "kv_bytes_per_token", where, positive=True)),
            _number(m, "decode_base_ms", where) / 1e3, _number(m, "decode_per_seq_ms", where) / 1e3,
            _number(m, "prefill_us_per_token", where) / 1e6,
            _number(m, "prefill_base_ms", where) / 1e3, scaling)
    fraction = _number(data, "pool_fraction", "", positive=True)
    if fraction > 1:
        raise ValueError(f"pool_fraction = {fraction} must be at most 1")
    memory = int(_number(data, "memory_gb", "", positive=True) * gb)
    return DeviceProfile(str(data["device"]), memory, fraction,
                         _number(data, "h2d_gbps", "", positive=True) * gb,
                         _number(data, "ssd_gbps", "", positive=True) * gb,
                         _number(data, "engine_init_s", ""), _number(data, "activation_s", ""),
                         _number(data, "evict_s", ""), models,
                         _number(data, "runner_build_s", "", 0.0))


def _number(section: dict, key: str, where: str, default: float | None = None, *,
            positive: bool = False) -> float:
    """A cost of the profile: a finite number, >= 0 (> 0 where `positive`); `where` prefixes
    its key in errors. Without a default a missing key is a KeyError naming it."""
    if key not in section and default is None:
        raise KeyError(f"{where}{key}")
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}{key} = {value!r} is not a finite number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}{key} = {value} must be {'> 0' if positive else '>= 0'}")
    return float(value)
