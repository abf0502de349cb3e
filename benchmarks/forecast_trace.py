"""The forecaster on the ServeGen trace's own per-model rates: is the real trace periodic?

    python benchmarks/forecast_trace.py [--skip-days 3] [--floor 0.05] [--json]

`warmserve predict` scores forecasts of replayed workloads, whose windows carry the replay's
own randomness. This scores the trace itself: each language model's aggregate request rate
per 10-minute window over ServeGen's 14 days, and the same summed to hourly windows. Every
window is forecast from all windows before it (learning online); the windows after the first
`--skip-days` days are scored, over windows whose rate is at least `--floor` times the
model's mean rate (the trace holds stretches of zero load, where relative errors mean
nothing). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

from warmserve.control.forecast_eval import evaluate_series
from warmserve.workload.builder import DAY_S
from warmserve.workload.traces import SERVEGEN_WINDOW_S, load_servegen_rates

WINDOWS = (("10 min", 1), ("1 hour", 6))  # label, trace windows summed into one


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-days", type=int, default=3,
                    help="days of history before the scored ones (default 3, as the presets)")
    ap.add_argument("--floor", type=float, default=0.05,
                    help="score windows whose rate is at least this times the mean (0.05)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.skip_days < 1 or not 0 <= args.floor < 1:
        ap.error("--skip-days must be >= 1 and --floor in [0, 1)")

    rows = {}
    for model, rates in sorted(load_servegen_rates().items()):
        days = len(rates) * SERVEGEN_WINDOW_S / DAY_S
        if days <= args.skip_days:
            print(f"{model}: {days:g} day(s) of trace, not more than --skip-days: not scored",
                  file=sys.stderr)
            continue
        for label, group in WINDOWS:
            series = rates[: len(rates) // group * group].reshape(-1, group).mean(axis=1)
            per_day = round(DAY_S / (SERVEGEN_WINDOW_S * group))
            rows[f"{model} {label}"] = {"model": model, "window": label, **evaluate_series(
                series, per_day, args.skip_days, floor=args.floor * float(series.mean()))}
    if not rows:
        ap.error(f"no model of the trace has more than --skip-days={args.skip_days} days")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"rate forecast errors (mean relative) on the ServeGen trace, "
                        f"days {args.skip_days + 1}+")
    for column in ("model", "window", "ours", "published", "naive: last window",
                   "naive: same slot yesterday", "windows scored"):
        table.add_column(column, justify="left" if column in ("model", "window") else "right")
    for row in rows.values():
        table.add_row(row["model"], row["window"], *(f"{100 * row[k]:.1f}%" for k in (
            "mre", "published_mre", "naive_last_window_mre", "naive_same_slot_yesterday_mre")),
            str(row["windows"]))
    Console().print(table)
    overall = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("mre", "published_mre")}
    print(f"mean over rows: ours {100 * overall['mre']:.1f}%, "
          f"published {100 * overall['published_mre']:.1f}%")


if __name__ == "__main__":
    main()
