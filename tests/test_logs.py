"""Logging set-up: the level given reaches every logger that speaks per request."""

from __future__ import annotations

import logging

import pytest

from warmserve.logs import current_log_level, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root, httpx = logging.getLogger().level, logging.getLogger("httpx").level
    yield
    logging.getLogger().setLevel(root)
    logging.getLogger("httpx").setLevel(httpx)


def test_the_level_set_is_the_level_reported():
    setup_logging("warning")
    assert current_log_level() == "warning"
    setup_logging("debug")
    assert current_log_level() == "debug"


def test_httpx_does_not_log_each_request_at_info():
    setup_logging("info")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    setup_logging("error")
    assert not logging.getLogger("httpx").isEnabledFor(logging.WARNING)


def test_an_unknown_level_is_named():
    with pytest.raises(ValueError, match="log level 'loud' is not one of debug, info"):
        setup_logging("loud")
