"""Files a simulation leaves behind: per-request CSV, the summary, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from warmserve.sim.simulator import SimResult
from warmserve.workload.builder import Workload


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
        written.append(plot_timeline(out / f"timeline-{name}.png", workload, result))
    return written


def plot_ttft_cdf(path: Path, results: dict[str, SimResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_timeline(path: Path, workload: Workload, result: SimResult) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(workload.models)[:8]
    fig, axes = plt.subplots(len(models), 1, figsize=(7.0, 1.8 * len(models)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], models, strict=True):
        line = result.timeline[name]
        t = np.asarray(line["t"])
        ax.step(t, line["load"], where="post", label="concurrency")
        ax.step(t, line["forecast_peak"], where="post", label="forecast peak", alpha=0.8)
        twin = ax.twinx()
        twin.step(t, line["instances"], where="post", color="k", label="instances")
        twin.step(t, line["prewarms"], where="post", color="g", alpha=0.6, label="prewarmed")
        ax.set_ylabel(name, fontsize=7)
        twin.set_ylabel("replicas", fontsize=7)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("simulated time (s)")
    fig.suptitle(f"{result.system}: load, forecast and replicas per model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
