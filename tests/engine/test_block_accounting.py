"""Property tests: block accounting stays exact under any mix of arrivals, steps, aborts,
preemptions, lending and reclaiming (scheduler and block manager, no model)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.engine.block_manager import BlockManager
from warmserve.engine.sampling import SamplingParams
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.sequence import FinishReason, Sequence

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 30)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("lend"), st.integers(0, 20), st.just(0)),
        st.tuples(st.just("reclaim"), st.integers(0, 20), st.just(0)),
    ),
    max_size=80,
)


def check_invariants(bm: BlockManager, sched: Scheduler, lent: list[int]) -> None:
    owners = Counter(bm._free)
    owners.update(lent)
    for seq in sched.running:
        owners.update(seq.block_table)
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert sorted(owners) == list(range(bm.num_blocks)), "a block is lost or held twice"
    assert max(owners.values()) == 1
    assert len(sched.running) <= sched.max_num_seqs


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(4, 40), st.sampled_from([1, 4, 16]), st.integers(8, 64))
def test_accounting_is_exact(ops, num_blocks, block_size, budget):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=6, max_tokens_per_step=budget)
    seqs: list[Sequence] = []
    lent: list[int] = []
    for op, a, b in ops:
        if op == "add":
            seq = Sequence(str(len(seqs)), list(range(a)), SamplingParams(max_tokens=b), 0.0)
            seqs.append(seq)
            sched.add(seq)
        elif op == "step":
            for _ in range(a):
                out = sched.schedule()
                to_sample = out.sequences_to_sample()
                sched.postprocess(out)
                for seq in to_sample:
                    seq.output_token_ids.append(7)
                    if len(seq.output_token_ids) >= seq.params.max_tokens:
                        sched.finish(seq, FinishReason.LENGTH)
        elif op == "abort" and seqs:
            seq = seqs[a % len(seqs)]
            if not seq.is_finished:
                sched.finish(seq, FinishReason.ABORT)
        elif op == "lend" and bm.can_lend(a):
            lent += bm.lend(a)
        elif op == "reclaim" and lent:
            back, lent = lent[:a], lent[a:]
            bm.reclaim(back)
        check_invariants(bm, sched, lent)
    for seq in seqs:
        if not seq.is_finished:
            sched.finish(seq, FinishReason.ABORT)
    bm.reclaim(lent)
    assert bm.num_free_blocks == bm.num_blocks == bm.num_usable_blocks


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=8), st.integers(6, 30))
def test_everything_finishes_under_pressure(prompt_lens, num_blocks):
    """No livelock: with preemption by recompute, every request finishes (or is cut for length
    when it cannot fit alone), whatever the cache size."""
    bm = BlockManager(num_blocks, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_tokens_per_step=16)
    seqs = [Sequence(str(i), list(range(n)), SamplingParams(max_tokens=10), 0.0)
            for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        out = sched.schedule()
        to_sample = out.sequences_to_sample()
        sched.postprocess(out)
        for seq in to_sample:
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) >= 10:
                sched.finish(seq, FinishReason.LENGTH)
    assert all(seq.is_finished for seq in seqs)
    assert bm.num_free_blocks == num_blocks
