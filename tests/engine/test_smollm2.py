"""Real weights: greedy generation equals transformers' for SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from warmserve.config import EngineConfig
from warmserve.engine.engine import create_engine
from warmserve.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint):
    config = EngineConfig(kv_cache_gib=0.1, max_num_seqs=8, max_tokens_per_step=256)
    return create_engine(smollm2_checkpoint, config, "float32", "cpu", 2048)


def test_capital_of_france(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    engine.add_request("paris", ids, SamplingParams(max_tokens=30, temperature=0))
    text = ""
    while engine.has_work():
        text += "".join(o.text for o in engine.step())
    assert text == "The capital of France is Paris."


def test_batched_greedy_equals_transformers(engine, smollm2_checkpoint):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_checkpoint), dtype=torch.float32).eval()
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    for i, ids in enumerate(prompts):  # all in one batch, with chunked prefill
        engine.add_request(f"q{i}", ids, SamplingParams(max_tokens=24, temperature=0))
    ours: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            ours.setdefault(out.request_id, []).extend(out.token_ids)
    eos = sorted(engine.tokenizer.eos_token_ids)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=eos, pad_token_id=eos[0])[0, len(ids):].tolist()
        assert ours[f"q{i}"] == expected, QUESTIONS[i]
