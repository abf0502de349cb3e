"""Files a simulation leaves behind: per-request CSV, the summary, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from warmserve.sim.simulator import SimResult
from warmserve.workload.builder import Workload

TIMELINE_MODELS = 8  # models plotted per timeline; its CSV holds every one


def write_outputs(out: Path, workload: Workload, results: dict[str, SimResult],
                  summary: dict[str, dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, result in results.items():
        path = out / f"requests-{name}.csv"
        pd.DataFrame({
            "arrival_s": workload.arrival_s,
            "model": np.asarray(workload.models)[workload.model_index],
            "input_tokens": workload.input_tokens, "output_tokens": workload.output_tokens,
            "ttft_s": result.ttft_s, "tpot_s": result.tpot_s, "dropped": result.dropped,
            # the longest wait for a next token after a hand-over (0 where none)
            "stall_s": result.stall_s if result.stall_s is not None else 0.0,
        }).to_csv(path, index=False, float_format="%.6g")
        written.append(path)
    written.append(plot_ttft_cdf(out / "ttft_cdf.png", results))
    for name, result in results.items():
        path = out / f"timeline-{name}.csv"
        timeline_frame(result, workload.window_s).to_csv(path, index=False,
                                                         float_format="%.6g")
        written.append(path)
        written.append(plot_timeline(out / f"timeline-{name}.png", workload, result))
    return written


def plot_ttft_cdf(path: Path, results: dict[str, SimResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crowded = len(results) > 6  # then the legend goes beside the axes, not over the curves
    fig, ax = plt.subplots(figsize=(9.0 if crowded else 6.4, 4.0))
    colors = plt.get_cmap("tab20").colors
    for k, (name, result) in enumerate(results.items()):
        ttft = np.sort(result.ttft_s[~result.dropped])
        if len(ttft):  # the systems solid, their variants and ablations dashed
            ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(result.ttft_s), label=name,
                    color=colors[(2 * k) % 20 + (2 * k) // 20], linestyle="--" if "-" in name
                    else "-")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    if crowded:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeline_frame(result: SimResult, window_s: float) -> pd.DataFrame:
    """One row per model and forecast window: the load seen, the forecasts made for it, the
    prewarmed replicas planned at its start and the instances it held on average."""
    rows = []
    for name, line in result.timeline.items():
        n = _windows_seen(line)
        starts = np.asarray(line["t"][:n])
        held = _time_weighted_mean(line["instances_t"], line["instances"], starts, window_s)
        rows.append(pd.DataFrame({
            "model": name, "window_start_s": starts,
            "avg_concurrency": line["avg"][:n], "peak_concurrency": line["peak"][:n],
            "forecast_avg": line["forecast_avg"][:n], "forecast_peak": line["forecast_peak"][:n],
            "prewarmed": line["prewarms"][:n], "instances_mean": held}))
    return pd.concat(rows, ignore_index=True)


def _windows_seen(line: dict[str, list]) -> int:
    """The windows of a timeline seen to their end (the last one started may not be)."""
    return min(len(line["t"]), len(line["avg"]))


def _time_weighted_mean(change_t: list[float], values: list[int], starts: np.ndarray,
                        window_s: float) -> np.ndarray:
    """The mean over each window [start, start + window_s) of a step function that takes
    `values[k]` from `change_t[k]` on (0 before the first change)."""
    t = np.concatenate([[-np.inf], change_t])
    v = np.concatenate([[0.0], values])
    out = np.zeros(len(starts))
    for k, start in enumerate(starts):
        end = start + window_s
        edges = np.clip(np.concatenate([t, [np.inf]]), start, end)
        out[k] = float(np.dot(np.diff(edges), v)) / window_s
    return out


def plot_timeline(path: Path, workload: Workload, result: SimResult,
                  most: int = TIMELINE_MODELS) -> Path:
    """Per model (the `most` with the most requests, busiest first): the load of each window
    against the forecast made for it, and the instances and prewarmed replicas over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = busiest_models(workload, most)
    fig, axes = plt.subplots(len(models), 1, figsize=(7.0, 1.8 * len(models)), sharex=True,
                             squeeze=False)
    end = result.duration_s
    for ax, name in zip(axes[:, 0], models, strict=True):
        line = result.timeline[name]
        n = _windows_seen(line)
        starts = line["t"][:n]
        _steps(ax, starts, line["avg"][:n], end, label="average concurrency",
               color="tab:blue", alpha=0.6)
        _steps(ax, starts, line["peak"][:n], end, label="peak concurrency", color="tab:blue")
        _steps(ax, starts, line["forecast_peak"][:n], end, label="forecast peak",
               color="tab:orange", ls="--")
        twin = ax.twinx()
        kept = [k for k, at in enumerate(line["instances_t"]) if at < end]  # not the drain
        _steps(twin, [line["instances_t"][k] for k in kept],
               [line["instances"][k] for k in kept], end, color="k", label="instances")
        _steps(twin, starts, line["prewarms"][:n], end, color="g", alpha=0.6,
               label="prewarmed")
        ax.set_ylim(bottom=0)
        twin.set_ylim(0, max(line["instances"] + line["prewarms"], default=0) + 0.5)
        twin.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(name, fontsize=7)
        twin.set_ylabel("replicas", fontsize=7)
    handles = [h for axis in (axes[-1, 0], twin) for h in axis.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7,
               bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()), frameon=False)
    axes[-1, 0].set_xlabel("simulated time (s)")
    shown = (f"the {len(models)} of {len(workload.models)} models with the most requests"
             if len(models) < len(workload.models) else "each model")
    fig.suptitle(f"{result.system}: load, forecast and replicas of {shown}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def busiest_models(workload: Workload, most: int) -> list[str]:
    """The `most` models with the most requests, busiest first (ties: in workload order)."""
    requests = np.bincount(workload.model_index, minlength=len(workload.models))
    return [workload.models[i] for i in np.argsort(-requests, kind="stable")[:most]]


def _steps(axis, starts: list[float], values: list[float], end: float, **style) -> None:
    """A step function that takes values[k] from starts[k] on, drawn to `end`."""
    if starts:
        axis.step(np.append(starts, end), np.append(values, values[-1]), where="post", **style)
