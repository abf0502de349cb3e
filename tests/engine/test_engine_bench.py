"""benchmarks/engine_bench.py's step timings: what each one runs, on the tiny model (CPU)."""

from __future__ import annotations

from benchmarks.engine_bench import mixed_step, tpot


def test_mixed_step_times_a_prompt_riding_with_the_decodes(make_engine):
    engine = make_engine(kv_cache_bytes=4 << 20, max_num_seqs=8, max_tokens_per_step=256)
    steps = []
    step = engine.step

    def recording_step():
        out = step()
        steps.append(dict(engine._last_step))
        return out

    engine.step = recording_step
    decode, mixed = mixed_step(engine, batch=4, n=64, device="cpu", reps=2)
    assert decode > 0 and mixed > 0
    riding = [s for s in steps if s["prefill_tokens"] == 64]
    assert len(riding) == 3 and all(s["decodes"] == 4 for s in riding)  # warm-up + 2 timed
    assert not engine.has_work()  # the decoding sequences are aborted when it is done


def test_tpot_times_decode_steps_at_the_context_asked(make_engine):
    engine = make_engine(kv_cache_bytes=4 << 20, max_num_seqs=8, max_tokens_per_step=256)
    assert tpot(engine, batch=2, device="cpu", steps=8, context=100) > 0
    assert not engine.has_work()
    assert engine.stats().prompt_tokens == 2 * 100


def test_first_steps_drives_every_request_to_its_end(make_engine):
    from benchmarks.first_steps import drive

    engine = make_engine(kv_cache_bytes=4 << 20, max_num_seqs=8, max_tokens_per_step=256)
    result = drive(engine, "t", seed=0, num_requests=5, modules=(), slow_s=10.0)
    assert not engine.has_work()
    assert engine.stats().prompt_tokens > 0 and result["compiled"] == 0  # no Triton on a CPU
    assert result["steps"] >= 5 and 0 < result["first_100_s"] <= result["all_s"]


def test_step_inputs_bench_times_both_paths():
    import random

    from benchmarks.step_inputs import time_batch, time_detokenizing

    times = time_batch(8, random.Random(0), context=300, prefill=64, repeat=2)
    assert len(times) == 3 and min(times) > 0
    assert time_detokenizing(4, random.Random(0), output=20, repeat=2) > 0
