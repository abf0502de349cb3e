"""Running the simulator from a workload spec: a preset name or a request CSV plus a config."""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from multiprocessing import Manager
from pathlib import Path

import numpy as np

from warmserve.config import WarmServeConfig
from warmserve.sim.metrics import summarize
from warmserve.sim.profiles import DeviceProfile, ModelCost, service_time_fn
from warmserve.sim.simulator import SimConfig, SimResult, Simulator
from warmserve.sim.systems import get_system
from warmserve.workload.builder import (
    WindowSeries,
    Workload,
    WorkloadSpec,
    build_workload,
    concurrency_by_window,
)
from warmserve.workload.presets import PRESETS, get_preset
from warmserve.workload.traces import load_request_file

SERVICE_BATCH = 16  # the batch at which a request's "ideal" duration is costed
MAX_GPUS = 131_072  # a cluster this large simulates a minute in seconds; 8x more, in a minute


class WorkloadError(ValueError):
    """The workload spec cannot be built; the message says why."""


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    costs: list[ModelCost]
    num_gpus: int
    gpus_per_node: int


def build_scenario(spec: str, config: WarmServeConfig, profile: DeviceProfile,
                   duration_s: float | None = None, seed: int | None = None,
                   window_s: float | None = None, rate_rps: float | None = None,
                   num_gpus: int | None = None, gpus_per_node: int | None = None,
                   time_scale: float | None = None, *, arrivals: str | None = None,
                   repeat_day: bool = False, history_days: int | None = None) -> Scenario:
    """A preset, or a request file (CSV) whose models come from `config`. `seed`, `rate_rps`,
    `time_scale` (trace seconds per simulated second), `arrivals` (clients or azure),
    `repeat_day` (earlier days replay the simulated one) and `history_days` (how many earlier
    days) change a preset's workload only."""
    if spec in PRESETS:
        preset = get_preset(spec).with_overrides(duration_s, seed, window_s, num_gpus,
                                                 gpus_per_node, time_scale, arrivals,
                                                 repeat_day or None, history_days)
        wspec = preset.workload
        if rate_rps is not None:
            wspec = replace(wspec, total_rate_rps=rate_rps)
        costs = [profile.model(shape) for shape in preset.shapes]
        _check_cluster(wspec.models, costs, preset.num_gpus, preset.gpus_per_node)
        workload = build_workload(wspec, service_time_fn(costs, SERVICE_BATCH))
        return Scenario(workload, costs, preset.num_gpus, preset.gpus_per_node)
    path = Path(spec)
    if not path.is_file():
        raise WorkloadError(f"workload {spec!r} is neither a preset ({', '.join(PRESETS)}) "
                            f"nor a request file")
    given = [name for name, value in (("rate", rate_rps), ("time scale", time_scale),
                                      ("arrivals", arrivals), ("repeat day", repeat_day or None),
                                      ("history days", history_days), ("seed", seed))
             if value is not None]
    if given:
        raise WorkloadError(f"{spec}: a request file replays its own arrivals; a rate, a "
                            f"time scale, arrivals, days of history or a seed apply to "
                            f"presets only (given: {', '.join(given)})")
    return _csv_scenario(path, config, profile, duration_s, window_s, num_gpus, gpus_per_node)


def _check_cluster(models: Sequence[str], costs: Sequence[ModelCost], num_gpus: int,
                   gpus_per_node: int) -> None:
    """Every model's instance must fit within one node of the cluster."""
    if num_gpus < 1 or gpus_per_node < 1:
        raise WorkloadError(f"a cluster needs GPUs: {num_gpus} GPUs, {gpus_per_node} per node")
    if num_gpus > MAX_GPUS:
        raise WorkloadError(f"{num_gpus:,} GPUs: the simulator holds at most {MAX_GPUS:,}")
    room = min(num_gpus, gpus_per_node)
    for name, cost in zip(models, costs, strict=True):
        if cost.tp > room:
            raise WorkloadError(f"model {name!r} runs on {cost.tp} GPUs of one node, and this "
                                f"cluster's nodes hold {room} ({num_gpus} GPUs, "
                                f"{gpus_per_node} per node)")


def _csv_scenario(path: Path, config: WarmServeConfig, profile: DeviceProfile,
                  duration_s: float | None, window_s: float | None, num_gpus: int | None,
                  gpus_per_node: int | None) -> Scenario:
    requests = load_request_file(path)
    names = [m.name for m in config.models]
    unknown = sorted(set(requests.model) - set(names))
    if unknown:
        raise WorkloadError(f"{path}: model(s) {', '.join(unknown[:5])} are not in the config "
                            f"(configured: {', '.join(names) or 'none'})")
    costs = []
    for model in config.models:
        scheme, _, shape = model.checkpoint.partition(":")
        if scheme != "synth" or shape not in profile.models:
            known = ", ".join(profile.models)
            raise WorkloadError(f"model {model.name!r}: the simulator needs a cost profile; give "
                                f"it checkpoint synth:SHAPE with SHAPE in {known}")
        costs.append(profile.model(shape))
    num_gpus = 16 if num_gpus is None else num_gpus
    gpus_per_node = 8 if gpus_per_node is None else gpus_per_node
    _check_cluster(names, costs, num_gpus, gpus_per_node)
    duration = (float(np.ceil(requests.arrival_s.max() + 1)) if duration_s is None
                else duration_s)
    keep = requests.arrival_s < duration
    index = np.array([names.index(m) for m in requests.model], dtype=np.int32)[keep]
    n_in, n_out = requests.input_tokens[keep], requests.output_tokens[keep]
    spec = WorkloadSpec(tuple(names), total_rate_rps=max(keep.sum() / duration, 1e-9),
                        duration_s=duration, shape="flat", history_periods=0,
                        window_s=config.policy.window_s if window_s is None else window_s)
    workload = Workload(spec, tuple(names), requests.arrival_s[keep], index,
                        n_in.astype(np.int32), n_out.astype(np.int32))
    service = service_time_fn(costs, SERVICE_BATCH)
    n = workload.num_windows
    for m, name in enumerate(names):
        sel = index == m
        start = workload.arrival_s[sel]
        avg, peak, rate = concurrency_by_window(start, start + service(m, n_in[sel], n_out[sel]),
                                                spec.window_s, n)
        workload.actual[name] = WindowSeries(avg[None], peak[None], rate[None])
    return Scenario(workload, costs, num_gpus, gpus_per_node)


def _run_one(args: tuple) -> tuple[str, SimResult]:
    scenario, name, config, profile, cache, report = args
    sim_config = SimConfig(scenario.num_gpus, scenario.gpus_per_node, config.policy, profile,
                           host_cache_bytes=cache,
                           step_tokens=config.engine.max_tokens_per_step)
    simulator = Simulator(scenario.workload, scenario.costs, get_system(name), sim_config)
    return name, simulator.run(progress=report)


def _store(reached: dict, name: str, simulated_s: float) -> None:
    reached[name] = simulated_s


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def simulate(scenario: Scenario, policies: list[str], config: WarmServeConfig,
             profile: DeviceProfile, jobs: int = 1,
             on_progress: Callable[[str, float], None] | None = None) -> dict[str, SimResult]:
    """Run each policy set on the same scenario (in parallel processes when jobs > 1).
    `on_progress(policy, simulated seconds reached)` is called as the runs go, in this
    process, and with the workload's duration when a run ends."""
    for name in policies:
        get_system(name)  # fail fast on an unknown name
    cache = int(config.cluster.nodes[0].pinned_cache_gib * (1 << 30))
    duration = scenario.workload.spec.duration_s
    results: dict[str, SimResult] = {}
    if jobs > 1 and len(policies) > 1:
        with Manager() if on_progress else nullcontext() as manager:
            # written by the workers, read here; only when someone follows the progress
            reached = manager.dict() if manager else None
            tasks = [(scenario, name, config, profile, cache,
                      None if reached is None else functools.partial(_store, reached, name))
                     for name in policies]
            # The workers ignore Ctrl-C: this process stops them all at once (terminate), so
            # that neither an interrupt nor a failed run waits for the runs still going.
            pool = multiprocessing.Pool(min(jobs, len(policies)), _ignore_interrupts)
            try:
                runs = [pool.apply_async(_run_one, (task,)) for task in tasks]
                while runs:
                    runs[0].wait(0.5)
                    for run in [r for r in runs if r.ready()]:
                        name, results[name] = run.get()  # a run's error is raised here
                        runs.remove(run)
                        if reached is not None:
                            reached[name] = duration
                    if on_progress and reached is not None:  # both or neither
                        for name, simulated_s in reached.items():
                            on_progress(name, simulated_s)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        return {name: results[name] for name in policies}
    for name in policies:
        report = functools.partial(on_progress, name) if on_progress else None
        _, results[name] = _run_one((scenario, name, config, profile, cache, report))
        if on_progress:
            on_progress(name, duration)
    return results


def summaries(results: dict[str, SimResult], ttft_slo_s: float) -> dict[str, dict]:
    return {name: summarize(result, ttft_slo_s) for name, result in results.items()}
