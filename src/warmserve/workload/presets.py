"""Named workloads with their clusters: `paper`, `scale`, and one per trace source."""

from __future__ import annotations

from dataclasses import dataclass, replace

from warmserve.workload.builder import WorkloadSpec


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    workload: WorkloadSpec
    shapes: tuple[str, ...]  # cost-profile shape of each model
    num_gpus: int
    gpus_per_node: int = 8

    def with_overrides(self, duration_s: float | None = None, seed: int | None = None,
                       window_s: float | None = None, num_gpus: int | None = None,
                       gpus_per_node: int | None = None, time_scale: float | None = None,
                       arrivals: str | None = None, repeat_day: bool | None = None,
                       history_days: int | None = None) -> Preset:
        """None keeps the preset's value; anything else, zero included, replaces it (and is
        validated where it is used)."""
        def pick(value, default):
            return default if value is None else value

        spec = self.workload
        spec = replace(spec, duration_s=pick(duration_s, spec.duration_s),
                       seed=pick(seed, spec.seed), window_s=pick(window_s, spec.window_s),
                       time_scale=pick(time_scale, spec.time_scale),
                       arrivals=pick(arrivals, spec.arrivals),
                       repeat_day=pick(repeat_day, spec.repeat_day),
                       history_periods=pick(history_days, spec.history_periods))
        return replace(self, workload=spec, num_gpus=pick(num_gpus, self.num_gpus),
                       gpus_per_node=pick(gpus_per_node, self.gpus_per_node))


_PAPER_MODELS = ("llama-2-7b-a", "llama-2-7b-b", "llama-2-13b", "llama-2-70b")
_PAPER_SHAPES = ("llama-2-7b", "llama-2-7b", "llama-2-13b", "llama-2-70b")


def _many(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    cycle = ("llama-3-8b", "llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-2-7b",
             "llama-2-70b", "llama-3-8b", "llama-2-13b")
    shapes = tuple(cycle[i % len(cycle)] for i in range(n))
    return tuple(f"m{i:02d}-{s}" for i, s in enumerate(shapes)), shapes


_M8, _S8 = _many(8)
_M64, _S64 = _many(64)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # The paper's cluster over-committed 2x at the peaks: provisioning each model for its
    # own peak (the dedicated system) would take 32 GPUs. That is what multi-LLM sharing is
    # for; tests/sim/test_presets.py holds the rate to it.
    Preset("paper", "The paper's setup: Llama-2 7B TP1 x2, 13B TP2, 70B TP4 on 2x8 H100; "
           "ServeGen's per-client arrivals, one day per model compressed 72x (a day in 20 "
           "min); Azure conv token lengths; 2x over-committed at the peaks",
           WorkloadSpec(_PAPER_MODELS, total_rate_rps=30.0, duration_s=1200.0, lengths="conv",
                        arrivals="clients", shape="servegen", time_scale=72.0, window_s=60.0),
           _PAPER_SHAPES, num_gpus=16),
    Preset("azure-conv", "The Azure conv trace as it is (one real hour, no day shape) on the "
           "paper's cluster", WorkloadSpec(_PAPER_MODELS, total_rate_rps=80.0,
                                           duration_s=1200.0, lengths="conv", shape="flat",
                                           time_scale=1.0, window_s=60.0, history_periods=0),
           _PAPER_SHAPES, num_gpus=16),
    Preset("azure-code", "The Azure code trace as it is (long prompts, short answers) on the "
           "paper's cluster", WorkloadSpec(_PAPER_MODELS, total_rate_rps=80.0,
                                           duration_s=1200.0, lengths="code", shape="flat",
                                           time_scale=1.0, window_s=60.0, history_periods=0),
           _PAPER_SHAPES, num_gpus=16),
    Preset("servegen", "Eight models replaying ServeGen's language-model clients (14 days) "
           "on 32 GPUs", WorkloadSpec(_M8, total_rate_rps=150.0, duration_s=1200.0,
                                      shape="servegen", arrivals="clients", time_scale=72.0,
                                      window_s=60.0), _S8, num_gpus=32),
    Preset("azure-functions", "Eight models following the busiest Azure Functions of 2019 (one "
           "day, per minute) on 32 GPUs", WorkloadSpec(_M8, total_rate_rps=150.0,
                                                       duration_s=1200.0, shape="functions",
                                                       time_scale=72.0, window_s=60.0),
           _S8, num_gpus=32),
    Preset("scale", "512 GPUs, 64 models alternating ServeGen and Azure Functions shapes, one "
           "hour (a day compressed 24x)",
           WorkloadSpec(_M64, total_rate_rps=600.0, duration_s=3600.0, shape="mixed",
                        time_scale=24.0, window_s=150.0, alpha=0.8), _S64, num_gpus=512),
    Preset("scale-clients", "`scale` with its ServeGen-shaped models replaying ServeGen's "
           "clients (burstier; slower to simulate)",
           WorkloadSpec(_M64, total_rate_rps=600.0, duration_s=3600.0, shape="mixed",
                        arrivals="clients", time_scale=24.0, window_s=150.0, alpha=0.8),
           _S64, num_gpus=512),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown workload preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
