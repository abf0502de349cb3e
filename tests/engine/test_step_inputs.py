"""The runner's host-side inputs of a step (numpy, no model): every token's id, position and
cache slot, and the decodes' padded block tables, against a token-by-token reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.engine.runner import GraphInputs, fill_decode_inputs, step_inputs
from warmserve.engine.sampling import SamplingParams
from warmserve.engine.scheduler import SchedulerOutput
from warmserve.engine.sequence import Sequence

BLOCK, WIDTH, SCRATCH = 4, 8, 99


def _sequence(name: str, prompt: int, output: int, computed: int, first_block: int) -> Sequence:
    seq = Sequence(name, [1000 + i for i in range(prompt)], SamplingParams(), 0.0,
                   output_token_ids=[5000 + i for i in range(output)])
    seq.num_computed_tokens = computed
    blocks = -(-seq.num_tokens // BLOCK)
    seq.block_table = [first_block + 3 * b for b in range(blocks)]  # not contiguous
    return seq


@given(prompt=st.integers(1, 20), output=st.integers(0, 20), data=st.data())
def test_token_ids_is_a_slice_of_prompt_and_output(prompt, output, data):
    seq = _sequence("a", prompt, output, 0, 0)
    start = data.draw(st.integers(0, seq.num_tokens))
    end = data.draw(st.integers(start, seq.num_tokens))
    assert seq.token_ids(start, end) == (seq.prompt_token_ids + seq.output_token_ids)[start:end]


SHAPES = st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(decodes=SHAPES, prefills=SHAPES, data=st.data())
def test_step_inputs_match_a_token_by_token_reference(decodes, prefills, data):
    if not decodes and not prefills:
        return
    out, expected, first_block = SchedulerOutput(), [], 0
    for i, (prompt, output) in enumerate(decodes):  # decodes: one token, the last one
        seq = _sequence(f"d{i}", prompt, output + 1, prompt + output, first_block)
        out.decodes.append(seq)
        first_block += 100
    for i, (prompt, output) in enumerate(prefills):  # a chunk of the uncomputed tokens
        seq = _sequence(f"p{i}", prompt, output, 0, first_block)
        seq.num_computed_tokens = data.draw(st.integers(0, seq.num_tokens - 1))
        n = data.draw(st.integers(1, seq.num_tokens - seq.num_computed_tokens))
        out.prefills.append((seq, n))
        first_block += 100
    for seq, n in out.scheduled():
        tokens = seq.prompt_token_ids + seq.output_token_ids
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            expected.append((tokens[pos], pos, seq.block_table[pos // BLOCK] * BLOCK + pos % BLOCK))

    host = step_inputs(out, BLOCK, SCRATCH, 2 * WIDTH)
    assert list(zip(host.ids, host.positions, host.slots, strict=True)) == expected
    assert host.decode_lens.tolist() == [s.num_computed_tokens + 1 for s in out.decodes]
    assert host.decode_tables.shape == (len(out.decodes), 2 * WIDTH)
    for row, seq in zip(host.decode_tables, out.decodes, strict=True):
        table = len(seq.block_table)
        assert row[:table].tolist() == seq.block_table and set(row[table:]) <= {SCRATCH}
    rows = np.cumsum([len(out.decodes)] + [n for _, n in out.prefills])
    assert [row for row, _, _, _ in host.prefills] == rows[:-1].tolist()
    for (seq, n), (_, length, start, table) in zip(out.prefills, host.prefills, strict=True):
        assert (length, start, table.tolist()) == (n, seq.num_computed_tokens, seq.block_table)
    assert {s.request_id: host.row_of[s.request_id] for s, _ in out.prefills} == {
        s.request_id: int(r) - 1 for (s, _), r in zip(out.prefills, rows[1:], strict=True)}
    assert [host.row_of[s.request_id] for s in out.decodes] == list(range(len(out.decodes)))


def test_graph_padding_rows_decode_into_the_scratch_block():
    seqs = [_sequence("a", 5, 2, 6, 0), _sequence("b", 3, 1, 3, 40)]
    columns, tables = np.full((4, 4), -1, np.int64), np.full((4, WIDTH), -1, np.int64)
    fill_decode_inputs(columns, tables, seqs, BLOCK, SCRATCH)
    ids, pos, slots, lens = columns.tolist()
    assert ids == [5001, 5000, 0, 0] and pos == [6, 3, 0, 0] and lens == [7, 4, 1, 1]
    assert slots == [3 * BLOCK + 2, 40 * BLOCK + 3, SCRATCH * BLOCK, SCRATCH * BLOCK]
    assert tables[0, :2].tolist() == [0, 3] and tables[1, :1].tolist() == [40]
    assert set(tables[0, 2:]) | set(tables[1, 1:]) | set(tables[2:].ravel()) == {SCRATCH}


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["grow", "preempt", "finish", "admit", "swap"]),
                              st.integers(0, 5)), max_size=40))
def test_graph_inputs_rewritten_step_after_step_equal_a_fresh_fill(ops):
    """GraphInputs rewrites only the blocks a row's table gained since the last step; after
    any mix of growth, preemption (the table cleared and refilled), finishing, admissions and
    reordering, its buffer equals one filled from scratch."""
    rows, blocks = 6, iter(range(10_000))
    graph = GraphInputs(np.empty((4, rows), np.int64), np.empty((rows, WIDTH), np.int64),
                        BLOCK, SCRATCH)
    running: list[Sequence] = []

    def grow(seq: Sequence, tokens: int) -> None:
        seq.output_token_ids += [7] * tokens
        seq.num_computed_tokens = seq.num_tokens - 1
        while len(seq.block_table) * BLOCK < seq.num_tokens:
            seq.block_table.append(next(blocks))

    for op, k in ops:
        if op == "admit" and len(running) < rows:
            seq = Sequence(f"s{k}", [1, 2], SamplingParams(), 0.0)
            grow(seq, 0)
            running.insert(k % (len(running) + 1), seq)
        elif running:
            seq = running[k % len(running)]
            if op == "grow":
                grow(seq, 1 + k)
            elif op == "preempt":  # as the scheduler does: blocks freed, then reallocated
                seq.block_table.clear()
                seq.num_preemptions += 1
                grow(seq, 0)
            elif op == "finish":
                running.remove(seq)
            elif op == "swap":
                running.append(running.pop(k % len(running)))
        running = [s for s in running if s.num_tokens <= WIDTH * BLOCK]
        graph.fill(running)
        columns, tables = np.empty((4, rows), np.int64), np.empty((rows, WIDTH), np.int64)
        fill_decode_inputs(columns, tables, running, BLOCK, SCRATCH)
        assert (graph.columns == columns).all() and (graph.tables == tables).all()
