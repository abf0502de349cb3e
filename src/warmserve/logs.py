"""Logging through the standard library, one format for every process."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str = "info") -> None:
    """Configure the root logger once per process (the CLI and worker entry points call this)."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    # httpx logs every request at INFO: a benchmark's thousands of lines would bury the rest
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def current_log_level() -> str:
    """The root logger's level as a LOG_LEVELS name (what setup_logging last set)."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
