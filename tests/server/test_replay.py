"""The bench's prompts: exactly as long as the trace says, whatever the model's tokenizer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from warmserve.bench.replay import prompt_ids
from warmserve.engine.checkpoint import read_arch
from warmserve.engine.tokenizer import Tokenizer


@given(st.integers(0, 4096), st.integers(0, 10**6))
def test_prompt_ids_have_the_asked_length_and_valid_ids(tokens, seed):
    ids = prompt_ids(tokens, seed)
    assert len(ids) == max(1, tokens)
    assert all(32 <= t < 127 for t in ids)


def test_prompts_differ_between_requests():
    assert prompt_ids(16, 1) != prompt_ids(16, 2)


def test_prompt_ids_are_valid_for_the_smallest_tokenizer(tiny_checkpoint):
    """The synthetic checkpoints' byte-level tokenizer holds every id the bench sends."""
    tokenizer = Tokenizer(tiny_checkpoint, read_arch(tiny_checkpoint))
    assert max(prompt_ids(512, 3)) < tokenizer.vocab_size
