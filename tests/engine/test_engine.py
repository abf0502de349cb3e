"""Engine behaviour: batching, chunking and preemption never change greedy outputs; bad input
fails alone; stops, aborts and lending keep the accounting exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.engine.conftest import run_all
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.engine.sequence import FinishReason

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = {f"r{i}": list(range(10 + i, 10 + i + 5 + 7 * i)) for i in range(6)}
BLOCK_BYTES = 4 * 2 * 2 * 2 * 16 * 4  # block of 4 tokens, tiny shape, fp32


def _alone(make_engine) -> dict[str, list[int]]:
    results = {}
    for rid, prompt in PROMPTS.items():
        engine = make_engine()
        engine.add_request(rid, prompt, GREEDY)
        results |= run_all(engine)
    return results


def test_batching_chunking_and_preemption_keep_greedy_outputs(make_engine):
    alone = _alone(make_engine)
    # Few blocks (forces preemption) and a small token budget (forces chunked prefill).
    engine = make_engine(kv_cache_bytes=BLOCK_BYTES * 30, max_tokens_per_step=16)
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY)
    together = run_all(engine)
    assert together == alone
    assert engine.stats().num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_requests_joining_mid_decode_match(make_engine):
    alone = _alone(make_engine)
    engine = make_engine()
    tokens: dict[str, list[int]] = {}
    pending = list(PROMPTS.items())
    while pending or engine.has_work():
        if pending:
            rid, prompt = pending.pop(0)
            engine.add_request(rid, prompt, GREEDY)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert tokens == alone


def test_every_step_hands_attention_tables_of_one_width(make_engine):
    """The decode kernels compile a variant per table width and dtype; eager steps (a prompt
    beside the decodes) must use the graphs' whatever the contexts, or a live step compiles."""
    engine = make_engine()
    forward, widths = engine.runner.model.forward, set()

    def spy(ids, positions, kv_cache, meta):
        if meta.num_decodes:  # the graphs' buffers: int64, max_blocks_per_seq wide
            tables, lens = meta.decode_block_tables, meta.decode_context_lens
            widths.add((tables.shape[1], tables.dtype, lens.dtype))
        return forward(ids, positions, kv_cache, meta)

    engine.runner.model.forward = spy
    tokens: dict[str, list[int]] = {}
    pending = list(PROMPTS.items())  # contexts of 2 to 14 blocks, joining mid-decode
    while pending or engine.has_work():
        if pending:
            engine.add_request(*pending.pop(0), GREEDY)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert widths == {(engine.runner.max_blocks_per_seq, torch.int64, torch.int64)}
    assert tokens == _alone(make_engine)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        (list(range(250)), SamplingParams(max_tokens=10), "exceeds the model's context of 256"),
        ([1, 2, 999], SamplingParams(), "outside the vocabulary"),
    ],
)
def test_bad_request_fails_alone(make_engine, prompt, params, message):
    engine = make_engine()
    engine.add_request("good", PROMPTS["r1"], GREEDY)
    first = [t for o in engine.step() for t in o.token_ids]
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert first + run_all(engine)["good"] == _alone(make_engine)["r1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_tokens": 0}, "max_tokens=0"), ({"temperature": -1}, "temperature=-1"),
     ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -2}, "top_k=-2"),
     ({"logprobs": 50}, "logprobs=50"), ({"stop": ("",)}, "stop=")],
)
def test_sampling_params_validate(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_duplicate_request_id_rejected(make_engine):
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [1, 2, 3], GREEDY)


def test_max_tokens_and_stop_token_ids(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPTS["r2"], SamplingParams(max_tokens=5, temperature=0))
    finals = []
    while engine.has_work():
        finals += [o for o in engine.step() if o.finished]
    assert finals[0].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    first = _alone(make_engine)["r2"]
    engine = make_engine()
    engine.add_request("b", PROMPTS["r2"], SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=(first[3],)))
    out = run_all(engine)["b"]
    assert out == first[: first.index(first[3]) + 1]


def test_stop_string_is_cut_and_never_streamed(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPTS["r3"], GREEDY)
    full = ""
    while engine.has_work():
        full += "".join(o.text for o in engine.step())
    stop = full[5:7]
    assert stop
    engine = make_engine()
    engine.add_request("b", PROMPTS["r3"], SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    pieces, last = [], None
    while engine.has_work():
        for o in engine.step():
            pieces.append(o.text)
            last = o
    assert "".join(pieces) == full[: full.find(stop)]
    assert last.finish_reason is FinishReason.STOP


def test_abort_frees_blocks_and_spares_others(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPTS["r4"], GREEDY)
    engine.add_request("b", PROMPTS["r1"], GREEDY)
    first = [t for o in engine.step() if o.request_id == "b" for t in o.token_ids]
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.abort_request("a") is None
    assert first + run_all(engine)["b"] == _alone(make_engine)["r1"]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks == bm.num_blocks


def test_handed_over_requests_resume_elsewhere_as_if_never_moved(make_engine):
    """hand_over_all stops every request with the tokens to resume from (its prompt and what
    it sent); another engine given those, and the rest of max_tokens, produces the rest of
    the greedy output the request would have had."""
    alone = _alone(make_engine)
    engine = make_engine()
    engine.add_request("a", PROMPTS["r2"], GREEDY)
    engine.add_request("b", PROMPTS["r3"], GREEDY)
    sent: dict[str, list[int]] = {}
    text = {"a": "", "b": ""}
    for _ in range(4):
        for out in engine.step():
            sent.setdefault(out.request_id, []).extend(out.token_ids)
            text[out.request_id] += out.text
    handed = {o.request_id: o for o in engine.hand_over_all()}
    assert all(o.text == "" for o in handed.values())  # what it held back goes on elsewhere
    assert set(handed) == {"a", "b"} and not engine.has_work()
    assert all(o.finished and o.finish_reason is FinishReason.HANDOVER for o in handed.values())
    assert handed["a"].resume.token_ids == PROMPTS["r2"] + sent["a"]
    assert handed["a"].resume.num_output_tokens == len(sent["a"])
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    other = make_engine()
    for rid, out in handed.items():
        other.add_request(rid, out.resume.token_ids,
                          SamplingParams(max_tokens=20 - len(sent[rid]), temperature=0,
                                         ignore_eos=True), out.resume)
    rest: dict[str, list[int]] = {}
    while other.has_work():
        for out in other.step():
            rest.setdefault(out.request_id, []).extend(out.token_ids)
            text[out.request_id] += out.text
    assert sent["a"] + rest["a"] == alone["r2"] and sent["b"] + rest["b"] == alone["r3"]
    whole = make_engine()
    whole.add_request("a", PROMPTS["r2"], GREEDY)
    whole_text = ""
    while whole.has_work():
        whole_text += "".join(out.text for out in whole.step())
    assert text["a"] == whole_text  # not a character lost or doubled at the hand-over


def test_a_stop_string_across_a_hand_over_is_caught(make_engine):
    """The stop string starts in text the first engine sent and ends in text the second one
    decodes: the second engine, which holds the output so far, still cuts the text there."""
    engine = make_engine()
    engine.add_request("a", PROMPTS["r3"], GREEDY)
    per_step = []
    while engine.has_work():
        per_step.append("".join(o.text for o in engine.step()))
    full = "".join(per_step)
    for steps in range(3, len(per_step) - 3):  # a hand-over point where the stop fits
        decoded = len("".join(per_step[:steps]))
        stop = full[decoded - 2:decoded + 3]
        if decoded >= 5 and len(stop) == 5 and full.find(stop) == decoded - 2:
            break
    else:
        pytest.skip("no stop string spans a hand-over point in this output")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,))
    first = make_engine()
    first.add_request("a", PROMPTS["r3"], params)
    text = ""
    for _ in range(steps):
        text += "".join(o.text for o in first.step())
    (handed,) = first.hand_over_all()
    assert handed.finish_reason is FinishReason.HANDOVER and len(text) <= decoded - 2
    second = make_engine()
    second.add_request("a", handed.resume.token_ids,
                       replace(params, max_tokens=20 - handed.resume.num_output_tokens),
                       handed.resume)
    last = None
    while second.has_work():
        for o in second.step():
            text += o.text
            last = o
    assert text == full[: decoded - 2] and last.finish_reason is FinishReason.STOP


def test_seeded_sampling_is_reproducible_and_independent_of_batch(make_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    engine = make_engine()
    engine.add_request("s", PROMPTS["r2"], params)
    alone = run_all(engine)["s"]
    engine = make_engine()
    engine.add_request("other", PROMPTS["r3"], SamplingParams(max_tokens=8, temperature=1.0))
    engine.add_request("s", PROMPTS["r2"], params)
    assert run_all(engine)["s"] == alone


def test_top_k_one_is_greedy_and_logprobs(make_engine):
    engine = make_engine()
    engine.add_request("k", PROMPTS["r1"], SamplingParams(
        max_tokens=20, temperature=0.7, top_k=1, ignore_eos=True, logprobs=3))
    logprobs = []
    while engine.has_work():
        for out in engine.step():
            logprobs += out.logprobs
    assert [lp.token_id for lp in logprobs] == _alone(make_engine)["r1"]
    for lp in logprobs:
        assert len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0][0] == lp.token_id
        assert lp.logprob == pytest.approx(lp.top_logprobs[0][1])
        assert lp.logprob <= 0


def test_lend_and_reclaim_while_decoding(make_engine):
    engine = make_engine(kv_cache_bytes=BLOCK_BYTES * 65)
    bm = engine.block_manager
    tokens: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)

    for rid in ("r0", "r1"):
        engine.add_request(rid, PROMPTS[rid], GREEDY)
    step()
    held = {b for s in engine.scheduler.running for b in s.block_table}
    lent = bm.lend(bm.num_free_blocks - 10)
    assert not held & set(lent)
    assert max(lent) == bm.num_blocks - 1  # the highest ids go first
    with pytest.raises(ValueError, match="cannot lend"):
        bm.lend(bm.num_free_blocks + 1)
    step()
    bm.reclaim(lent)
    with pytest.raises(ValueError, match="were not lent"):
        bm.reclaim(lent[:1])
    while engine.has_work():
        step()
    alone = _alone(make_engine)
    assert tokens["r0"] == alone["r0"] and tokens["r1"] == alone["r1"]


def test_a_lone_sequence_short_of_lent_blocks_waits_for_them_not_cut(make_engine):
    """A request that fits the whole cache but not what is left after lending must not be cut
    for length (it was, live: 65 of 100 tokens): it waits until the blocks come back, then
    finishes whole, token for token as alone."""
    engine = make_engine(kv_cache_bytes=BLOCK_BYTES * 17)  # 16 usable blocks = 64 tokens
    bm = engine.block_manager
    lent = bm.lend(8)  # 32 tokens left
    engine.add_request("r", list(range(1, 11)), SamplingParams(max_tokens=40, temperature=0,
                                                               ignore_eos=True))
    outs = []
    for _ in range(100):
        outs += engine.step()
    assert not any(o.finished for o in outs)  # stalled, not cut
    stats = engine.stats()
    assert stats.num_waiting == 1 and stats.num_blocked == 1 and not engine.last_step_ran
    bm.reclaim(lent)
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].num_output_tokens == 40
    alone = make_engine(kv_cache_bytes=BLOCK_BYTES * 17)
    alone.add_request("r", list(range(1, 11)), SamplingParams(max_tokens=40, temperature=0,
                                                              ignore_eos=True))
    assert run_all(alone)["r"] == [t for o in outs for t in o.token_ids]


def test_sequence_larger_than_cache_finishes_with_length(make_engine):
    engine = make_engine(kv_cache_bytes=BLOCK_BYTES * 4)  # 3 usable blocks = 12 tokens
    engine.add_request("big", list(range(1, 11)), SamplingParams(max_tokens=30, temperature=0,
                                                                 ignore_eos=True))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stats(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPTS["r0"], GREEDY)
    engine.add_request("b", PROMPTS["r1"], GREEDY)
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running) == (2, 0)
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.num_blocks_free < stats.num_blocks_usable


def test_work_counters(make_engine):
    """What the controller's prefill-aware signal reads: prompt tokens added and prefilled
    (in chunks here), the seconds spent, the requests finished."""
    engine = make_engine(max_tokens_per_step=16)
    prompts = [PROMPTS["r3"], PROMPTS["r4"]]
    for rid, prompt in zip("ab", prompts, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    stats = engine.stats()
    assert stats.prompt_tokens == sum(map(len, prompts)) and stats.prefill_tokens == 0
    run_all(engine)
    stats = engine.stats()
    assert stats.prefill_tokens == stats.prompt_tokens and stats.finished == 2
    assert 0 < stats.prefill_s < stats.busy_s


def test_requests_queued_for_batch_slots_are_not_blocked(make_engine):
    """Waiting because the batch is full is not waiting for KV blocks: num_blocked stays 0."""
    engine = make_engine(max_num_seqs=1)
    for rid in ("a", "b"):
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=5, temperature=0,
                                                          ignore_eos=True))
    engine.step()
    stats = engine.stats()
    assert stats.num_waiting == 1 and stats.num_blocked == 0


def test_a_prompt_longer_than_the_blocks_in_service_waits_for_lent_ones(make_engine):
    """A prompt that fits the whole cache but not the blocks left after lending is not admitted
    chunk by chunk (it would fill what is there, be preempted, and start over, again and
    again): it waits, blocked, and runs whole once the blocks come back."""
    engine = make_engine(kv_cache_bytes=BLOCK_BYTES * 17, max_tokens_per_step=16)
    bm = engine.block_manager
    lent = bm.lend(8)  # 8 blocks = 32 tokens in service
    prompt = [1 + i % 50 for i in range(40)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    engine.add_request("r", prompt, params)
    ran = 0
    for _ in range(50):
        engine.step()
        ran += engine.last_step_ran
    assert ran == 0 and engine.stats().num_blocked == 1
    bm.reclaim(lent)
    outs = []
    while engine.has_work():
        outs += engine.step()
    alone = make_engine(kv_cache_bytes=BLOCK_BYTES * 17, max_tokens_per_step=16)
    alone.add_request("r", prompt, params)
    assert [t for o in outs for t in o.token_ids] == run_all(alone)["r"]
    assert engine.stats().num_preemptions == 0


def test_a_request_output_pickles_with_every_field():
    import dataclasses
    import pickle

    from warmserve.engine.engine import RequestOutput, Resume
    from warmserve.engine.sampling import SampledToken

    full = RequestOutput("r", [1, 2], "ab", [SampledToken(1, -0.5, ((1, -0.5),))], True,
                         FinishReason.HANDOVER, 7, 2, "bad", Resume([3, 1, 2], 2, 1))
    assert all(getattr(full, f.name) != f.default for f in dataclasses.fields(full))
    assert pickle.loads(pickle.dumps(full)) == full
