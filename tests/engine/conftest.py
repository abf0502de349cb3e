from __future__ import annotations

import pytest

from warmserve.config import EngineConfig
from warmserve.engine.engine import LLMEngine, create_engine
from warmserve.engine.loader import TorchProvider


@pytest.fixture
def make_engine(tiny_checkpoint):
    def make(kv_cache_bytes: int = 1 << 20, **limits) -> LLMEngine:
        config = EngineConfig(block_size_tokens=limits.pop("block_size_tokens", 4), **limits)
        return create_engine(tiny_checkpoint, config, "float32", "cpu", max_context=256,
                             kv_cache_bytes=kv_cache_bytes, provider=TorchProvider(poison=True))
    return make


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens
