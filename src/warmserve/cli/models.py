"""`warmserve models`: list, synthesize, import and try checkpoints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from warmserve.cli.common import (
    ConfigOpt,
    VerbLogLevel,
    checkpoint_cache,
    console,
    fail,
    models_app,
    verb_log_level,
)
from warmserve.config import SYNTH_SHAPES, ConfigError, load_config


@models_app.command("list")
def models_list(config: ConfigOpt = None,
                as_json: Annotated[bool, typer.Option("--json")] = False,
    log_level: VerbLogLevel = None,
) -> None:
    """List the configured models and the cached checkpoints."""
    verb_log_level(log_level)
    from warmserve.engine.checkpoint import list_checkpoints

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    cached = list_checkpoints(checkpoint_cache())
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
    cache_table = Table(title=f"cached checkpoints in {checkpoint_cache()}")
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
    verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, write_synthetic

    target = out or checkpoint_cache() / "synth" / shape
    try:
        path = write_synthetic(shape, target, dtype=dtype, seed=seed, progress=console.print)
    except CheckpointError as exc:
        raise fail(str(exc)) from None
    print(path)


@models_app.command("import")
def models_import(
    spec: Annotated[str, typer.Argument(help="gguf:FILE or package:NAME (a package with a GGUF).")],
    log_level: VerbLogLevel = None,
) -> None:
    """Convert a GGUF checkpoint once into a cached safetensors directory."""
    verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, resolve_checkpoint

    if not spec.startswith(("gguf:", "package:")):
        raise fail(f"{spec!r}: expected gguf:FILE or package:NAME")
    try:
        print(resolve_checkpoint(spec, checkpoint_cache()))
    except CheckpointError as exc:
        raise fail(str(exc)) from None


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
    verb_log_level(log_level)
    from warmserve.engine.checkpoint import CheckpointError, resolve_checkpoint
    from warmserve.engine.engine import create_engine
    from warmserve.engine.loader import checked_device
    from warmserve.engine.loop import EngineLoop
    from warmserve.engine.sampling import InvalidRequestError, SamplingParams

    try:
        checked_device(device)  # before a checkpoint is read or converted
        cfg = load_config(config)
        spec = cfg.model(model) if model else cfg.models[0]
        path = resolve_checkpoint(spec.checkpoint, checkpoint_cache())
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except (ConfigError, CheckpointError, InvalidRequestError, IndexError, ValueError) as exc:
        raise fail(str(exc) or "the config has no models") from None
    start = time.perf_counter()
    engine = create_engine(path, cfg.engine, spec.dtype, device, spec.max_context)
    loop = EngineLoop(engine, spec.name)
    console.print(f"[dim]{spec.name} loaded in {time.perf_counter() - start:.1f} s[/dim]")
    try:
        messages = [{"role": "user", "content": prompt}]
        stream = loop.submit(messages if chat else prompt, params)
    except InvalidRequestError as exc:
        raise fail(str(exc)) from None
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
