"""`warmserve simulate` and `warmserve predict`: the simulator and the forecaster on workloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from warmserve.cli.common import (
    ArrivalsOpt,
    HistoryDaysOpt,
    RepeatDayOpt,
    SloOpt,
    TimeScaleOpt,
    VerbLogLevel,
    WorkloadOpt,
    app,
    console,
    fail,
    fmt,
    print_summary,
    reason,
    verb_log_level,
)
from warmserve.config import ConfigError, load_config


@app.command()
def simulate(
    workload: WorkloadOpt = "paper",
    config: Annotated[str, typer.Option("--config", "-c", help="Config (models of a CSV "
                                        "workload, policy parameters).")] = "h100-node",
    gpus: Annotated[int | None, typer.Option(help="GPUs in the cluster.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node.")] = None,
    policies: Annotated[str, typer.Option(
        help="Comma-separated policy sets; 'all' adds the stronger baseline variants and the "
             "ablations.")] = "warmserve,serverlessllm,muxserve,dedicated",
    duration: Annotated[float | None, typer.Option(help="Simulated seconds.")] = None,
    rate: Annotated[float | None, typer.Option(help="Total request rate (preset only).")] = None,
    time_scale: TimeScaleOpt = None,
    arrivals: ArrivalsOpt = None,
    repeat_day: RepeatDayOpt = False,
    history_days: HistoryDaysOpt = None,
    seed: Annotated[int | None, typer.Option(help="Workload seed.")] = None,
    slo: SloOpt = None,
    profile: Annotated[str, typer.Option(help="Cost profile name or YAML file.")] = "h100",
    profile_set: Annotated[list[str] | None, typer.Option(
        "--profile-set", metavar="KEY=VALUE",
        help="Replace a top-level cost of the profile, e.g. engine_init_s=0 (repeatable).")
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Policies simulated in parallel.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write CSVs and plots here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Simulate the cluster under a workload for each policy set and compare."""
    verb_log_level(log_level)
    from rich.progress import Progress

    from warmserve.sim.profiles import load_profile, parse_override
    from warmserve.sim.report import write_outputs
    from warmserve.sim.run import WorkloadError, build_scenario, summaries
    from warmserve.sim.run import simulate as run_sim
    from warmserve.sim.systems import ABLATIONS, DEFAULT_SYSTEMS, VARIANTS
    from warmserve.workload.traces import TraceError

    names = list(dict.fromkeys(p.strip() for p in policies.split(",") if p.strip()))
    if names == ["all"]:
        names = list(DEFAULT_SYSTEMS) + list(VARIANTS) + list(ABLATIONS)
    if not names:
        raise fail(f"--policies {policies!r}: name one or more policy sets, or 'all'")
    if out is not None and out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a folder")
    overrides = {}
    for setting in profile_set or []:
        parsed = parse_override(setting)
        if parsed is None:
            raise fail(f"--profile-set {setting!r}: expected KEY=NUMBER")
        overrides[parsed[0]] = parsed[1]
    try:
        cfg = load_config(config)
        prof = load_profile(profile, overrides)
        scenario = build_scenario(workload, cfg, prof, duration, seed, None, rate, gpus,
                                  gpus_per_node, time_scale, arrivals=arrivals,
                                  repeat_day=repeat_day, history_days=history_days)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)  # before the runs, not after
        with Progress(console=console, transient=True, disable=as_json) as progress:
            duration = scenario.workload.spec.duration_s
            task = progress.add_task(f"simulating {len(names)} policies",
                                     total=len(names) * duration)
            reached: dict[str, float] = {}

            def advance(name: str, simulated_s: float) -> None:
                reached[name] = simulated_s
                progress.update(task, completed=sum(reached.values()))

            results = run_sim(scenario, names, cfg, prof, jobs, on_progress=advance)
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError) as exc:
        raise fail(reason(exc)) from None
    summary = summaries(results, slo or cfg.policy.ttft_slo_s)
    if out:
        write_outputs(out, scenario.workload, results, summary)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print_summary(summary, scenario)


@app.command()
def predict(
    workload: WorkloadOpt = "paper",
    window: Annotated[float | None, typer.Option(help="Forecast window (simulated s).")] = None,
    duration: Annotated[float | None, typer.Option(help="Simulated seconds.")] = None,
    time_scale: TimeScaleOpt = None,
    arrivals: ArrivalsOpt = None,
    repeat_day: RepeatDayOpt = False,
    history_days: HistoryDaysOpt = None,
    config: Annotated[str, typer.Option("--config", "-c")] = "h100-node",
    profile: Annotated[str, typer.Option(help="Cost profile name or YAML file.")] = "h100",
    seed: Annotated[int | None, typer.Option()] = None,
    oracle_replays: Annotated[int, typer.Option(
        min=0, max=64, help="Also score an oracle that knows the load shape: the mean of this "
        "many replays of the preset under other seeds (the floor of any forecaster).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Forecast each model's load window by window and report the errors."""
    verb_log_level(log_level)
    from warmserve.control.forecast_eval import evaluate_forecasts
    from warmserve.sim.profiles import load_profile
    from warmserve.sim.run import WorkloadError, build_scenario
    from warmserve.workload.presets import PRESETS
    from warmserve.workload.traces import TraceError

    try:
        cfg = load_config(config)
        prof = load_profile(profile)
        options = {"time_scale": time_scale, "arrivals": arrivals, "repeat_day": repeat_day,
                   "history_days": history_days}
        scenario = build_scenario(workload, cfg, prof, duration, seed, window, **options)
        if oracle_replays and workload not in PRESETS:
            raise WorkloadError(f"--oracle-replays needs a preset: a request file such as "
                                f"{workload!r} is one replay only")
        base = scenario.workload.spec.seed
        replays = [build_scenario(workload, cfg, prof, duration, base + k, window,
                                  **options).workload
                   for k in range(1, oracle_replays + 1)]
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError) as exc:
        raise fail(reason(exc)) from None
    report = evaluate_forecasts(scenario.workload, cfg.policy.error_correction_windows,
                                replays or None)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"forecast errors (mean relative), window {scenario.workload.window_s} s")
    keys = ["peak_mre", "avg_mre", "naive_last_window_peak_mre",
            "naive_same_slot_yesterday_peak_mre"]
    columns = ["model", "peak", "avg", "naive last window", "naive same slot yesterday"]
    if replays:
        keys += ["oracle_peak_mre", "oracle_avg_mre"]
        columns += ["oracle peak", "oracle avg"]
    for column in columns:
        table.add_column(column, justify="right")
    rows = [*report["models"].items(), ("overall", report["overall"])]
    with_history = report["with_history"]
    if with_history and with_history["models"] < report["overall"]["models"]:
        rows.append((f"with history ({with_history['models']})", with_history))
    for name, row in rows:
        mark = " [red](worse than both naive)[/red]" if row["worse_than_both_naive"] else ""
        table.add_row(name + mark, *(fmt(row[k]) for k in keys))
    Console().print(table)
    if not any(row["windows_scored"] for row in report["models"].values()):
        console.print("[yellow]nothing scored: the span holds no whole window after the "
                      "first; give a shorter --window or a longer --duration[/yellow]")
    alone = [n for n, row in report["models"].items() if row["same_slot_mean_alone"]]
    if alone:
        console.print(f"[dim]forecast by the same slot's mean alone, where a backtest on the "
                      f"earlier days found them repeating: {', '.join(alone)}[/dim]")
    for note in scenario.workload.notes:
        console.print(f"[dim]{note}[/dim]")
