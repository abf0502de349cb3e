"""The configuration tree: one place for every default, validated once at the edge.

A config file is YAML with up to five sections (`cluster`, `models`, `engine`, `policy`,
`server`); anything omitted takes the default written here. `load_config` parses a file (or a
built-in name such as ``cpu-local``), validates it, and returns a frozen `WarmServeConfig`.
Every error names the file, the field and the offending value.

Derived quantities (page counts, KV blocks) are never written back here: they belong to the
runtime records of the parts that compute them.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_CONFIGS = {
    "cpu-local": "cpu-local.yaml",
    "h100-node": "h100-node.yaml",
    "h100-live": "h100-live.yaml",
}
DEFAULT_CONFIG_NAME = "cpu-local"
# Where converted and synthetic checkpoints are cached (the CLI's --cache-dir overrides it).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "warmserve"

# Shapes `synth:<shape>` may name; the engine's checkpoint module defines their dimensions.
SYNTH_SHAPES = ("tiny", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b")
CHECKPOINT_SCHEMES = ("hf", "gguf", "synth", "package")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field and the value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DeviceGroupConfig(_Frozen):
    """A group of identical devices in one node."""

    type: Literal["cuda", "cpu"] = Field("cpu", description="Device kind: a CUDA GPU or the CPU.")
    count: int = Field(1, ge=1, le=64, description="Number of such devices in the node.")
    memory_gib: float = Field(
        4.0, gt=0, le=4096, description="Memory per device usable for weights and KV cache (GiB)."
    )
    h2d_gbps: float = Field(
        52.0, gt=0, le=10_000,
        description="Host-to-device copy bandwidth from pinned memory (GB/s).",
    )


class NodeConfig(_Frozen):
    """One machine of the cluster."""

    name: str = Field("node0", min_length=1, max_length=64, description="Node name, unique.")
    devices: list[DeviceGroupConfig] = Field(
        default_factory=lambda: [DeviceGroupConfig()], min_length=1,
        description="Device groups of this node.",
    )
    host_memory_gib: float = Field(16.0, gt=0, description="Host DRAM of the node (GiB).")
    pinned_cache_gib: float = Field(
        4.0, ge=0, description="Pinned host memory reserved for cached checkpoints (GiB)."
    )
    disk_read_gbps: float = Field(
        2.0, gt=0, description="Checkpoint read bandwidth from disk (GB/s)."
    )

    @property
    def num_devices(self) -> int:
        return sum(group.count for group in self.devices)

    @model_validator(mode="after")
    def _cache_fits_host(self) -> NodeConfig:
        if self.pinned_cache_gib > self.host_memory_gib:
            raise ValueError(
                f"pinned_cache_gib={self.pinned_cache_gib} exceeds "
                f"host_memory_gib={self.host_memory_gib}"
            )
        return self


class ClusterConfig(_Frozen):
    """The machines WarmServe runs on."""

    nodes: list[NodeConfig] = Field(default_factory=lambda: [NodeConfig()], min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterConfig:
        _require_unique([node.name for node in self.nodes], "cluster.nodes", "name")
        return self


class ModelConfig(_Frozen):
    """One served model. Several entries may share a checkpoint: they are distinct models."""

    name: str = Field(min_length=1, max_length=128, description="Model name clients ask for.")
    checkpoint: str = Field(
        description=(
            "Where the weights come from: 'hf:DIR' (a Hugging Face directory), 'gguf:FILE', "
            "'package:NAME' (a Python package that carries a GGUF file) or 'synth:SHAPE' "
            f"(random weights of a real shape: {', '.join(SYNTH_SHAPES)})."
        )
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "bfloat16", description="Weight and activation dtype."
    )
    tensor_parallel: int = Field(1, ge=1, le=8, description="GPUs per instance (power of two).")
    max_context: int = Field(
        4096, ge=16, le=1_048_576, description="Longest prompt plus output, in tokens."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not re.fullmatch(r"[A-Za-z0-9._:/-]+", self.name):
            raise ValueError(f"name={self.name!r} may hold only letters, digits and ._:/-")
        if self.tensor_parallel & (self.tensor_parallel - 1):
            raise ValueError(f"tensor_parallel={self.tensor_parallel} is not a power of two")
        scheme, _, rest = self.checkpoint.partition(":")
        if scheme not in CHECKPOINT_SCHEMES or not rest:
            raise ValueError(
                f"checkpoint={self.checkpoint!r} must be SCHEME:VALUE with SCHEME one of "
                f"{', '.join(CHECKPOINT_SCHEMES)}"
            )
        if scheme == "synth" and rest not in SYNTH_SHAPES:
            raise ValueError(
                f"checkpoint={self.checkpoint!r} names an unknown shape; "
                f"known: {', '.join(SYNTH_SHAPES)}"
            )
        return self


class EngineConfig(_Frozen):
    """Per-instance inference engine limits."""

    block_size_tokens: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    max_num_seqs: int = Field(32, ge=1, le=4096, description="Most sequences running at once.")
    max_tokens_per_step: int = Field(
        2048, ge=16, le=131_072, description="Token budget of one step (chunked prefill)."
    )
    kv_cache_gib: float | None = Field(
        None, gt=0,
        description="KV cache size per instance (GiB); default: what the device has left.",
    )
    use_cuda_graphs: bool = Field(True, description="Capture decode steps as CUDA graphs on GPU.")
    max_cuda_graph_batch: int = Field(
        64, ge=1, le=1024, description="Largest decode batch captured as a CUDA graph."
    )


class PolicyConfig(_Frozen):
    """Control-plane parameters (constants of the published artifact as defaults)."""

    window_s: float = Field(300.0, gt=0, description="Forecast window length (s).")
    control_interval_s: float = Field(0.5, gt=0, le=60, description="Controller period (s).")
    instance_capacity: int = Field(
        32, ge=1, le=4096, description="Concurrent requests one instance serves (B)."
    )
    scale_up_ratio: float = Field(
        0.8, gt=0, le=1, description="Scale up when load exceeds this share of capacity."
    )
    scale_down_ratio: float = Field(
        0.5, gt=0, lt=1, description="Scale down when load falls below this share of capacity."
    )
    load_window_s: float = Field(5.0, gt=0, description="Averaging window of the load signal (s).")
    new_instance_protect_s: float = Field(
        5.0, ge=0, description="New instances are never scaled down within this time (s)."
    )
    error_correction_windows: int = Field(
        10, ge=0, le=100, description="Past windows whose forecast errors correct the next one."
    )
    max_slots_per_device: int = Field(
        30, ge=1, le=1024, description="Most resident models (slots) in one device's pool."
    )
    pool_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Share of a device's free memory turned into pool pages."
    )
    page_size_mib: int = Field(
        32, ge=2, le=1024,
        description="Pool page size (MiB). 32: per-call driver costs grow with the number of "
        "physical allocations, and 2-MiB pages make mapping 10x slower (docs/memory.md).",
    )
    min_instances: int = Field(
        1, ge=0, le=1024, description="Live controller: fewest active instances per model "
        "(0 lets idle models scale to zero)."
    )
    keep_alive_s: float = Field(
        60.0, ge=0, description="Reactive baseline: idle instances stay loaded this long (s)."
    )
    rebalance_reserve_s: float = Field(
        60.0, gt=0, description="WarmServe rebalancing: how long a group being drained for a "
        "starving model stays reserved for it (s)."
    )
    ttft_slo_s: float = Field(1.0, gt=0, description="TTFT service-level objective (s).")

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if self.scale_down_ratio >= self.scale_up_ratio:
            raise ValueError(
                f"scale_down_ratio={self.scale_down_ratio} must be below "
                f"scale_up_ratio={self.scale_up_ratio}"
            )
        if self.page_size_mib & (self.page_size_mib - 1):
            raise ValueError(f"page_size_mib={self.page_size_mib} is not a power of two")
        return self


class ServerConfig(_Frozen):
    """The HTTP front end."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys accepted; empty means no authentication."
    )
    max_queued_per_model: int = Field(
        256, ge=1, description="Requests waiting per model before new ones get 429."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body.")
    wait_for_room_s: float = Field(
        30.0, ge=0, le=3600,
        description="How long a request for a model that no worker can take now waits for one "
        "(counted in flight, so the controller sees it and may free a worker) before it gets "
        "503; 0 answers at once.",
    )


class WarmServeConfig(_Frozen):
    """The whole configuration."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _check(self) -> WarmServeConfig:
        _require_unique([m.name for m in self.models], "models", "name")
        largest_node = max(node.num_devices for node in self.cluster.nodes)
        for model in self.models:
            if model.tensor_parallel > largest_node:
                raise ValueError(
                    f"model {model.name!r}: tensor_parallel={model.tensor_parallel} exceeds the "
                    f"largest node's {largest_node} devices"
                )
        return self

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise ConfigError(f"unknown model {name!r}; configured models: {known}")


def _require_unique(values: list[str], where: str, field: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{where}: duplicate {field} {value!r}")
        seen.add(value)


ConfigSource = Annotated[str | Path, "a path to a YAML file or a built-in config name"]


def load_config(source: ConfigSource | None = None) -> WarmServeConfig:
    """Load and validate a config from a YAML file or a built-in name (default: cpu-local)."""
    name, text = _read_source(DEFAULT_CONFIG_NAME if source is None else source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML: {exc}") from None
    return parse_config(data if data is not None else {}, name)


def parse_config(data: Any, name: str = "<config>") -> WarmServeConfig:
    """Validate an already-parsed mapping; errors are prefixed with `name`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return WarmServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{name}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def builtin_config_text(name: str) -> str:
    return resources.files("warmserve.configs").joinpath(BUILTIN_CONFIGS[name]).read_text()


def _read_source(source: ConfigSource) -> tuple[str, str]:
    if isinstance(source, str) and source in BUILTIN_CONFIGS:
        return f"<built-in {source}>", builtin_config_text(source)
    path = Path(source)
    if not path.is_file():
        known = ", ".join(BUILTIN_CONFIGS)
        raise ConfigError(f"config {str(source)!r} is neither a file nor a built-in name ({known})")
    return str(path), path.read_text()


def _describe(err: Any) -> str:
    location = ".".join(str(part) for part in err["loc"]) or "<top>"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("missing", "value_error"):
        return f"{location}: {message}"
    return f"{location}: {message} (got {err['input']!r})"
