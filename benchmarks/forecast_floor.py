"""How much of the forecast error no forecaster can remove: the replay-noise floor.

    python benchmarks/forecast_floor.py [--workloads paper,servegen] [--replicas 8]

A preset's days are fixed per model; its seed draws only the requests (arrival times, lengths,
which clients fire). So the same preset under other seeds is the same load shape replayed with
fresh randomness. An oracle that knows the shape exactly predicts each window's expected value;
we estimate it as the mean over `--replicas` other seeds, and score it on seed 0 like the
forecaster (`warmserve predict`): mean relative error over all windows but the first, where the
actual value is at least 1. Whatever the oracle still misses is noise of that one replay, out of
any forecaster's reach. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse

import numpy as np

from warmserve.config import load_config
from warmserve.control.forecast_eval import evaluate_forecasts
from warmserve.control.predictor import mean_relative_error
from warmserve.sim.profiles import load_profile
from warmserve.sim.run import build_scenario


def floor_of(workload_name: str, replicas: int, window_s: float | None) -> list[tuple]:
    config, profile = load_config("h100-node"), load_profile("h100")
    target = build_scenario(workload_name, config, profile, seed=0, window_s=window_s).workload
    others = [build_scenario(workload_name, config, profile, seed=s, window_s=window_s).workload
              for s in range(1, replicas + 1)]
    report = evaluate_forecasts(target, config.policy.error_correction_windows)
    rows = []
    for name in target.models:
        entry = report["models"][name]
        if not entry["has_history"]:
            continue
        rows.append((name, entry["peak_mre"], entry["avg_mre"], entry["mean_peak_concurrency"],
                     *(_oracle_mre(target, others, name, metric)
                       for metric in ("peak_concurrency", "avg_concurrency"))))
    return rows


def _oracle_mre(target, others, name: str, metric: str) -> float:
    actual = getattr(target.actual[name], metric)[0]
    expected = np.mean([getattr(w.actual[name], metric)[0] for w in others], axis=0)
    return mean_relative_error(expected[1:], actual[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="paper,servegen")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--window", type=float, default=None, help="forecast window (simulated s)")
    args = ap.parse_args()
    header = (f"{'workload':10s} {'model':22s} {'mean peak':>9s} {'peak: ours':>11s} "
              f"{'peak: oracle':>12s} {'avg: ours':>10s} {'avg: oracle':>11s}")
    print(header)
    for workload_name in args.workloads.split(","):
        rows = floor_of(workload_name, args.replicas, args.window)
        for name, peak, avg, mean_peak, oracle_peak, oracle_avg in rows:
            print(f"{workload_name:10s} {name:22s} {mean_peak:9.1f} {peak:11.1%} "
                  f"{oracle_peak:12.1%} {avg:10.1%} {oracle_avg:11.1%}")
        cols = list(zip(*rows, strict=True))
        print(f"{workload_name:10s} {'mean':22s} {np.mean(cols[3]):9.1f} {np.mean(cols[1]):11.1%} "
              f"{np.mean(cols[4]):12.1%} {np.mean(cols[2]):10.1%} {np.mean(cols[5]):11.1%}")


if __name__ == "__main__":
    main()
