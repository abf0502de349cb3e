"""What every verb shares: the Typer apps, common options, global options and errors.

This is the only module of the package that reads environment variables.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from warmserve import __version__
from warmserve.config import DEFAULT_CACHE_DIR
from warmserve.logs import LOG_LEVELS, setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="WarmServe: serve many LLMs on shared GPUs with one-for-many prewarming.")
models_app = typer.Typer(no_args_is_help=True,
                         help="Checkpoints: synthesize, import, list, generate.")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

LogLevel = Annotated[str, typer.Option("--log-level", help=f"One of {', '.join(LOG_LEVELS)}.")]
VerbLogLevel = Annotated[str | None, typer.Option(
    "--log-level", help=f"One of {', '.join(LOG_LEVELS)} (overrides the global option).")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="Config YAML file or built-in name (cpu-local, h100-node).")]


class _State:
    cache_dir: Path = DEFAULT_CACHE_DIR


def checkpoint_cache() -> Path:
    return _State.cache_dir


def verb_log_level(level: str | None) -> None:
    if level is None:
        return
    try:
        setup_logging(level)
    except ValueError as exc:
        raise fail(str(exc)) from None


def fail(message: str) -> typer.Exit:
    """Print an error (its text as it is: no markup, no emoji codes) and the exit to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", emoji=False)
    return typer.Exit(code=2)


def reason(exc: Exception) -> str:
    """What an exception says, without the quotes str() puts around a KeyError's message."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


@app.callback()
def _main(
    log_level: LogLevel = "info",
    cache_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint cache (default: $WARMSERVE_CACHE_DIR or ~/.cache/warmserve).")] = None,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    """WarmServe: serve many LLMs on shared GPUs with one-for-many prewarming."""
    if version:
        print(__version__)
        raise typer.Exit()
    try:
        setup_logging(log_level)
    except ValueError as exc:
        raise fail(str(exc)) from None
    env_cache = os.environ.get("WARMSERVE_CACHE_DIR")
    _State.cache_dir = cache_dir or (Path(env_cache) if env_cache else DEFAULT_CACHE_DIR)


WorkloadOpt = Annotated[str, typer.Option(
    "--workload", "-w", help="A preset (paper, scale, scale-clients, azure-conv, azure-code, "
    "servegen, azure-functions) or a request CSV (arrival_s,model,input_tokens,output_tokens).")]
TimeScaleOpt = Annotated[float | None, typer.Option(
    min=0.001, help="Trace seconds per simulated second (preset only; 1 replays the traces' "
    "days in real time).")]
ArrivalsOpt = Annotated[str | None, typer.Option(
    help="Arrival process (preset only): clients (ServeGen's per-client processes) or azure "
    "(the Azure LLM trace's arrival times thinned to the rate shape).")]


def _finite_slo(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value}: the TTFT SLO must be a finite number of seconds > 0")
    return value


SloOpt = Annotated[float | None, typer.Option(callback=_finite_slo, help="TTFT SLO in seconds.")]
HistoryDaysOpt = Annotated[int | None, typer.Option(  # max: workload.builder.MAX_HISTORY_DAYS
    min=0, max=13, help="Preset only: earlier days of each model's history, the forecast's "
    "seasonal baseline (the presets hold 3; ServeGen's 14 days allow 13).")]
RepeatDayOpt = Annotated[bool, typer.Option(
    "--repeat-day", help="Preset only: every earlier day of history replays the simulated "
    "day drawn again, so that days repeat (the load forecasting is built for).")]


def print_summary(summary: dict[str, dict], scenario) -> None:
    w = scenario.workload
    table = Table(title=f"{w.num_requests} requests, {len(w.models)} models, "
                        f"{scenario.num_gpus} GPUs, {w.spec.duration_s:.0f} s")
    columns = {"ttft_p50_s": "TTFT p50 s", "ttft_p99_s": "TTFT p99 s", "tpot_mean_s": "TPOT s",
               "slo_attainment": "in SLO", "completed": "done", "dropped": "drop",
               "gpu_seconds_busy": "GPU·s", "cold_starts": "cold", "prewarm_hits": "warm"}
    table.add_column("policy", no_wrap=True)
    for header in columns.values():
        table.add_column(header, justify="right")
    for name, row in summary.items():
        table.add_row(name, *(fmt(row[c]) for c in columns))
    Console(width=max(Console().width, 120)).print(table)
    console.print("[dim]in SLO: share of requests with TTFT within the SLO; cold: cold starts; "
                  "warm: scale-ups served by a prewarmed replica[/dim]")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1000 else f"{value:.0f}"
    return str(value)
