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
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="Config YAML file or built-in name (cpu-local, h100-node).")]


class _State:
    cache_dir: Path = DEFAULT_CACHE_DIR


def _cache_dir() -> Path:
    return _State.cache_dir


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
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the configured models and the cached checkpoints."""
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
) -> None:
    """Write a random-weight checkpoint of a real model shape (safetensors directory)."""
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
) -> None:
    """Convert a GGUF checkpoint once into a cached safetensors directory."""
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
) -> None:
    """Stream one answer from a configured model through the engine."""
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
