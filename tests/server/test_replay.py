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


def test_live_summary_counts_activations_over_the_run_only():
    """Activations are the run's cold starts plus prewarm hits (the counters' change over the
    run), whoever activated; other endpoints have no such counters."""
    from warmserve.bench.replay import Result, summarize_live

    results = [Result(ttft_s=0.2, tpot_s=0.01, tokens=4, ok=True, status=200),
               Result(ttft_s=2.0, tpot_s=0.01, tokens=4, ok=True, status=200),
               Result(status=429, error="too many requests in flight for a")]
    before = {"cold_starts": 5, "prewarm_hits": 7}
    after = {"cold_starts": 6, "prewarm_hits": 10, "controller_actions": []}
    live = summarize_live(results, 10.0, 1.0, after, before)
    assert (live["cold_starts"], live["prewarm_hits"], live["activations"]) == (1, 3, 4)
    assert live["completed"] == 2 and live["dropped"] == 1 and live["rejected_429"] == 1
    assert live["requests_within_slo"] == 1
    assert live["errors"] == {"too many requests in flight for a": 1}  # what went wrong, said
    other = summarize_live(results, 10.0, 1.0, None, None)
    assert other["activations"] is None and other["cold_starts"] is None


def test_a_stream_that_stalls_longer_than_the_slo_misses_it():
    """A first chunk within the TTFT SLO is not enough: a later wait longer than the SLO
    (a request handed over mid-stream, say) misses it too, as the simulator counts it."""
    from warmserve.bench.replay import Result, summarize_live

    results = [Result(ttft_s=0.2, tpot_s=0.01, longest_gap_s=0.05, tokens=4, ok=True),
               Result(ttft_s=0.2, tpot_s=0.3, longest_gap_s=1.5, tokens=4, ok=True),
               Result(ttft_s=2.0, tpot_s=0.3, longest_gap_s=1.5, tokens=4, ok=True)]
    live = summarize_live(results, 10.0, 1.0)
    assert live["requests_within_slo"] == 1 and live["stalled_past_slo"] == 1
    assert live["slo_attainment"] == 1 / 3
