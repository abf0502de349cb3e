"""The `warmserve` command line: one verb per job of the product.

Verbs appear when they do their job; the README says which issue brings the others
(serve, simulate, bench, predict). This is the only module that reads environment variables.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from warmserve import __version__
from warmserve.config import DEFAULT_CACHE_DIR, SYNTH_SHAPES, ConfigError, load_config
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


def _cache_dir() -> Path:
    return _State.cache_dir


def _verb_log_level(level: str | None) -> None:
    if level is None:
        return
    try:
        setup_logging(level)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


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
        raise _fail(str(exc)) from None
    env_cache = os.environ.get("WARMSERVE_CACHE_DIR")
    _State.cache_dir = cache_dir or (Path(env_cache) if env_cache else DEFAULT_CACHE_DIR)


@models_app.command("list")
def models_list(config: ConfigOpt = None,
                as_json: Annotated[bool, typer.Option("--json")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """List the configured models and the cached checkpoints."""
    _verb_log_level(log_level)
    from warmserve.engine.checkpoint import list_checkpoints

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    cached = list_checkpoints(_cache_dir())
    if as_json:
        print(json.dumps({
            "models": [m.model_dump() for m in cfg.models],
            "cached": [{"name": n, "path": str(p)} for n, p in cached],
        }, indent=2))
        return
    table = Table(title="configured models")
    for column in ("name", "checkpoint", "dtype", "TP", "max context"):
        table.add_column(column)
    for m in cfg.models:
        table.add_row(m.name, m.checkpoint, m.dtype, str(m.tensor_parallel), str(m.max_context))
    Console().print(table)
    cache_table = Table(title=f"cached checkpoints in {_cache_dir()}")
    cache_table.add_column("name")
    cache_table.add_column("path")
    for name, path in cached:
        cache_table.add_row(name, str(path))
    Console().print(cache_table)


@models_app.command("synth")
def models_synth(
    shape: Annotated[str, typer.Argument(help=f"One of {', '.join(SYNTH_SHAPES)}.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (default: the cache).")] = None,
    dtype: Annotated[str, typer.Option(help="float16 or bfloat16.")] = "bfloat16",
    seed: int = 0,
    log_level: VerbLogLevel = None,
) -> None:
    """Write a random-weight checkpoint of a real model shape (safetensors directory)."""
    _verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, write_synthetic

    target = out or _cache_dir() / "synth" / shape
    try:
        path = write_synthetic(shape, target, dtype=dtype, seed=seed, progress=console.print)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    print(path)


@models_app.command("import")
def models_import(
    spec: Annotated[str, typer.Argument(help="gguf:FILE or package:NAME (a package with a GGUF).")],
    log_level: VerbLogLevel = None,
) -> None:
    """Convert a GGUF checkpoint once into a cached safetensors directory."""
    _verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, resolve_checkpoint

    if not spec.startswith(("gguf:", "package:")):
        raise _fail(f"{spec!r}: expected gguf:FILE or package:NAME")
    try:
        print(resolve_checkpoint(spec, _cache_dir()))
    except CheckpointError as exc:
        raise _fail(str(exc)) from None


@models_app.command("generate")
def models_generate(
    model: Annotated[str | None, typer.Argument(help="Model name (default: the first).")] = None,
    config: ConfigOpt = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "What is the capital of France?",
    max_tokens: int = 64,
    temperature: float = 0.0,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    chat: Annotated[bool, typer.Option(help="Apply the model's chat template.")] = True,
    log_level: VerbLogLevel = None,
) -> None:
    """Stream one answer from a configured model through the engine."""
    _verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, resolve_checkpoint
    from warmserve.engine.engine import create_engine
    from warmserve.engine.loop import EngineLoop
    from warmserve.engine.sampling import InvalidRequestError, SamplingParams

    try:
        cfg = load_config(config)
        spec = cfg.model(model) if model else cfg.models[0]
        path = resolve_checkpoint(spec.checkpoint, _cache_dir())
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except (ConfigError, CheckpointError, InvalidRequestError, IndexError) as exc:
        raise _fail(str(exc) or "the config has no models") from None
    start = time.perf_counter()
    engine = create_engine(path, cfg.engine, spec.dtype, device, spec.max_context)
    loop = EngineLoop(engine, spec.name)
    console.print(f"[dim]{spec.name} loaded in {time.perf_counter() - start:.1f} s[/dim]")
    try:
        messages = [{"role": "user", "content": prompt}]
        stream = loop.submit(messages if chat else prompt, params)
    except InvalidRequestError as exc:
        raise _fail(str(exc)) from None
    start = time.perf_counter()
    first = None
    for output in stream:
        first = first or time.perf_counter()
        sys.stdout.write(output.text)
        sys.stdout.flush()
        last = output
    elapsed = time.perf_counter() - start
    print()
    console.print(
        f"[dim]{last.num_output_tokens} tokens, TTFT {first - start:.3f} s, "
        f"{last.num_output_tokens / elapsed:.1f} tokens/s, finish: "
        f"{last.finish_reason.value if last.finish_reason else '-'}[/dim]"
    )
    loop.shutdown()


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address (default: the config's).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: the config's).")] = None,
    policy: Annotated[str, typer.Option(
        help="warmserve, serverlessllm, muxserve or dedicated: the same policy sets as the "
             "simulator, live.")] = "warmserve",
    history: Annotated[Path | None, typer.Option(
        help="CSV of earlier windows to seed the forecaster: model,avg_concurrency,"
             "peak_concurrency,rate_rps (oldest first).")] = None,
    log_level: VerbLogLevel = None,
) -> None:
    """Serve the configured models behind one OpenAI-compatible endpoint."""
    _verb_log_level(log_level)
    import uvicorn

    from warmserve.cluster.manager import LocalCluster, NoCapacity
    from warmserve.controller.loop import Controller
    from warmserve.server.app import create_app
    from warmserve.sim.systems import get_system

    source = config or "cpu-local"
    try:
        cfg = load_config(source)
        if policy not in ("warmserve", "serverlessllm", "muxserve", "dedicated"):
            raise ValueError(f"--policy {policy!r}: one of warmserve, serverlessllm, muxserve, "
                             f"dedicated")
        system = get_system(policy)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    cluster = LocalCluster(source, cfg, _cache_dir())
    console.print(f"starting {len(cluster.workers)} workers for {len(cfg.models)} models ...")
    cluster.start()
    try:
        cluster.warm_up(system)
    except NoCapacity as exc:
        cluster.close()
        raise _fail(str(exc)) from None
    controller = Controller(cluster, cfg, system=system)
    if history is not None:
        from warmserve.workload.traces import TraceError

        try:
            console.print(f"forecaster seeded with {controller.seed_history(history)} windows")
        except TraceError as exc:
            cluster.close()
            raise _fail(str(exc)) from None
    controller.start()
    try:
        uvicorn.run(create_app(cluster, cfg, controller), host=host or cfg.server.host,
                    port=cfg.server.port if port is None else port,
                    log_level=log_level or "info", timeout_graceful_shutdown=30)
    finally:
        controller.stop()
        cluster.close()


WorkloadOpt = Annotated[str, typer.Option(
    "--workload", "-w", help="A preset (paper, scale, azure-conv, azure-code, servegen, "
    "azure-functions) or a request CSV (arrival_s,model,input_tokens,output_tokens).")]


@app.command()
def simulate(
    workload: WorkloadOpt = "paper",
    config: Annotated[str, typer.Option("--config", "-c", help="Config (models of a CSV "
                                        "workload, policy parameters).")] = "h100-node",
    gpus: Annotated[int | None, typer.Option(help="GPUs in the cluster.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per node.")] = None,
    policies: Annotated[str, typer.Option(help="Comma-separated policy sets; 'all' adds the "
                                          "ablations.")] = "warmserve,serverlessllm,muxserve,"
                                                           "dedicated",
    duration: Annotated[float | None, typer.Option(help="Simulated seconds.")] = None,
    rate: Annotated[float | None, typer.Option(help="Total request rate (preset only).")] = None,
    seed: Annotated[int | None, typer.Option(help="Workload seed.")] = None,
    slo: Annotated[float | None, typer.Option(help="TTFT SLO in seconds.")] = None,
    profile: Annotated[str, typer.Option(help="Cost profile name or YAML file.")] = "h100",
    jobs: Annotated[int, typer.Option(help="Policies simulated in parallel.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write CSVs and plots here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Simulate the cluster under a workload for each policy set and compare."""
    _verb_log_level(log_level)
    from rich.progress import Progress

    from warmserve.sim.profiles import load_profile
    from warmserve.sim.report import write_outputs
    from warmserve.sim.run import WorkloadError, build_scenario, summaries
    from warmserve.sim.run import simulate as run_sim
    from warmserve.sim.systems import ABLATIONS, DEFAULT_SYSTEMS
    from warmserve.workload.traces import TraceError

    names = [p.strip() for p in policies.split(",") if p.strip()]
    if names == ["all"]:
        names = list(DEFAULT_SYSTEMS) + list(ABLATIONS)
    try:
        cfg = load_config(config)
        prof = load_profile(profile)
        scenario = build_scenario(workload, cfg, prof, duration, seed, None, rate, gpus,
                                  gpus_per_node)
        with Progress(console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"simulating {len(names)} policies", total=len(names))
            results = run_sim(scenario, names, cfg, prof, jobs,
                              on_done=lambda _: progress.advance(task))
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    summary = summaries(results, slo or cfg.policy.ttft_slo_s)
    if out:
        write_outputs(out, scenario.workload, results, summary)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, scenario)


def _print_summary(summary: dict[str, dict], scenario) -> None:
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
        table.add_row(name, *(_fmt(row[c]) for c in columns))
    Console(width=max(Console().width, 120)).print(table)
    console.print("[dim]in SLO: share of requests with TTFT within the SLO; cold: cold starts; "
                  "warm: scale-ups served by a prewarmed replica[/dim]")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1000 else f"{value:.0f}"
    return str(value)


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible endpoint.")],
    workload: WorkloadOpt = "paper",
    duration: Annotated[float | None, typer.Option(help="Replay only this many seconds.")] = 60.0,
    rate: Annotated[float | None, typer.Option(help="Total request rate (preset only).")] = None,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated served models for workload models 0, 1, … (default: /v1/models).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Bearer key.")] = None,
    max_input_tokens: int = 1024,
    max_output_tokens: int = 512,
    slo: Annotated[float, typer.Option(help="TTFT SLO in seconds.")] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    config: Annotated[str, typer.Option("--config", "-c")] = "h100-node",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Replay a workload open-loop against an endpoint; same keys as `simulate --json`."""
    _verb_log_level(log_level)
    import asyncio

    import httpx

    from warmserve.bench.replay import replay, summarize_live
    from warmserve.sim.profiles import load_profile
    from warmserve.sim.run import WorkloadError, build_scenario
    from warmserve.workload.traces import TraceError

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        cfg = load_config(config)
        scenario = build_scenario(workload, cfg, load_profile("h100"), duration, seed, None, rate)
        served = models.split(",") if models else [
            m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers).json()["data"]]
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError,
            httpx.HTTPError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    w = scenario.workload
    span = duration or float(w.arrival_s.max(initial=0.0))
    console.print(f"replaying {int((w.arrival_s < span).sum())} requests over {span:.0f} s "
                  f"on {', '.join(served)}")
    def cluster_view() -> dict | None:
        try:
            return httpx.get(f"{url}/v1/cluster", headers=headers).json()
        except (httpx.HTTPError, ValueError):
            return None

    before = cluster_view()
    results = asyncio.run(replay(url, w, served, api_key, max_input_tokens, max_output_tokens,
                                 duration_s=duration))
    summary = {"live": summarize_live(results, span, slo, cluster_view(), before)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, scenario)


@app.command()
def predict(
    workload: WorkloadOpt = "paper",
    window: Annotated[float | None, typer.Option(help="Forecast window (simulated s).")] = None,
    config: Annotated[str, typer.Option("--config", "-c")] = "h100-node",
    profile: Annotated[str, typer.Option(help="Cost profile name or YAML file.")] = "h100",
    seed: Annotated[int | None, typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Forecast each model's load window by window and report the errors."""
    _verb_log_level(log_level)
    from warmserve.control.forecast_eval import evaluate_forecasts
    from warmserve.sim.profiles import load_profile
    from warmserve.sim.run import WorkloadError, build_scenario
    from warmserve.workload.traces import TraceError

    try:
        cfg = load_config(config)
        scenario = build_scenario(workload, cfg, load_profile(profile), seed=seed,
                                  window_s=window)
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    report = evaluate_forecasts(scenario.workload, cfg.policy.error_correction_windows)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"forecast errors (mean relative), window {scenario.workload.window_s} s")
    for column in ("model", "peak", "avg", "naive last window", "naive same slot yesterday"):
        table.add_column(column, justify="right")
    rows = [*report["models"].items(), ("overall", report["overall"])]
    for name, row in rows:
        table.add_row(name, *(_fmt(row[k]) for k in (
            "peak_mre", "avg_mre", "naive_last_window_peak_mre",
            "naive_same_slot_yesterday_peak_mre")))
    Console().print(table)
    for note in scenario.workload.notes:
        console.print(f"[dim]{note}[/dim]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
