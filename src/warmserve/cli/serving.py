"""`warmserve serve` and `warmserve bench`: the live system and its load generator."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from warmserve.cli.common import (
    ConfigOpt,
    SloOpt,
    VerbLogLevel,
    WorkloadOpt,
    app,
    checkpoint_cache,
    console,
    fail,
    print_summary,
    reason,
    verb_log_level,
)
from warmserve.config import ConfigError, load_config
from warmserve.logs import current_log_level


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address (default: the config's).")] = None,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="Port (default: the config's).")] = None,
    policy: Annotated[str, typer.Option(
        help="warmserve, warmserve-goodput, warmserve-no-handover, serverlessllm, muxserve or "
             "dedicated: the same policy sets as the simulator, live.")] = "warmserve",
    history: Annotated[Path | None, typer.Option(
        help="CSV of earlier windows to seed the forecaster: model,avg_concurrency,"
             "peak_concurrency,rate_rps (oldest first).")] = None,
    log_level: VerbLogLevel = None,
) -> None:
    """Serve the configured models behind one OpenAI-compatible endpoint."""
    verb_log_level(log_level)
    import uvicorn

    from warmserve.cluster.manager import CannotServe, LocalCluster, NoCapacity
    from warmserve.controller.loop import Controller
    from warmserve.server.app import create_app
    from warmserve.sim.systems import get_live_system
    from warmserve.workload.traces import TraceError, load_history

    source = config or "cpu-local"
    try:
        cfg = load_config(source)
        system = get_live_system(policy)
        # read now: a bad file is named before any worker starts
        rows = None if history is None else load_history(history, {m.name for m in cfg.models})
    except (ConfigError, ValueError, TraceError) as exc:
        raise fail(str(exc)) from None
    host = host or cfg.server.host
    port = cfg.server.port if port is None else port
    _check_can_listen(host, port)
    cluster = LocalCluster(source, cfg, checkpoint_cache())
    try:
        cluster.check_servable()
    except CannotServe as exc:
        raise fail(str(exc)) from None
    console.print(f"starting {len(cluster.workers)} workers for {len(cfg.models)} models ...")
    cluster.start()
    try:
        cluster.warm_up(system)
    except NoCapacity as exc:
        cluster.close()
        raise fail(str(exc)) from None
    controller = Controller(cluster, cfg, system=system)
    if rows is not None:
        console.print(f"forecaster seeded with {controller.seed_rows(rows)} windows")
    controller.start()
    # uvicorn stops gracefully on SIGTERM and then raises it again: this handler turns that
    # into an exit that runs the `finally` below (the workers closed), not an abrupt one
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(create_app(cluster, cfg, controller), host=host, port=port,
                    log_level=current_log_level(), timeout_graceful_shutdown=30)
    finally:
        controller.stop()
        cluster.close()


def _check_can_listen(host: str, port: int) -> None:
    """Fail before any worker starts, not after, where the address cannot be listened on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except (OSError, OverflowError) as exc:
        raise fail(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}"
                   ) from None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


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
    max_input_tokens: Annotated[int, typer.Option(min=1, help="Cap on a prompt's tokens.")] = 1024,
    max_output_tokens: Annotated[int, typer.Option(
        min=1, help="Cap on a request's output tokens.")] = 512,
    slo: SloOpt = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    config: Annotated[str, typer.Option("--config", "-c")] = "h100-node",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """Replay a workload open-loop against an endpoint; same keys as `simulate --json`."""
    verb_log_level(log_level)
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
    except (ConfigError, WorkloadError, TraceError, ValueError, KeyError, OSError) as exc:
        raise fail(reason(exc)) from None
    try:  # the endpoint answers, and serves the models asked for, before any request is sent
        answer = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        answer.raise_for_status()
        offered = [m["id"] for m in answer.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise fail(f"{url}/v1/models: {reason(exc) or type(exc).__name__}") from None
    served = [m.strip() for m in models.split(",") if m.strip()] if models else offered
    missing = [m for m in served if m not in offered]
    if missing or not served:
        raise fail(f"{url} does not serve {', '.join(missing) or 'any model'} "
                   f"(it serves: {', '.join(offered) or 'none'})")
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
    print_summary(summary, scenario)
