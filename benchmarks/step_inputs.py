"""The host's share of one engine step: building its inputs before the GPU runs, and
detokenizing the tokens it sampled after (a step's sampling syncs with the host, so none of
it overlaps the GPU's work).

    python benchmarks/step_inputs.py
    python benchmarks/step_inputs.py --batches 1,64,256 --context 4000 --prefill 2048

For each batch of decoding sequences (contexts drawn up to `--context` tokens, as prompt plus
output) it times the inputs of a graph replay, written whole (`fill_decode_inputs`, a batch
the graph's buffer has not held) and a step later (`GraphInputs`, which writes only what
changed), and of an eager step with a `--prefill`-token prompt chunk beside the decodes
(`step_inputs`); and detokenizing one new token of each sequence, whose outputs hold
`--output` tokens (the synthetic checkpoints' byte-level tokenizer). Needs no GPU. Prints a
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.engine.runner import GraphInputs, fill_decode_inputs, step_inputs
from warmserve.engine.sampling import SamplingParams
from warmserve.engine.scheduler import SchedulerOutput
from warmserve.engine.sequence import Sequence
from warmserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, write_byte_tokenizer

BLOCK_SIZE = 16


def make_sequence(name: str, rng: random.Random, prompt: int, output: int, first_block: int
                  ) -> Sequence:
    seq = Sequence(name, [rng.randrange(32000) for _ in range(prompt)], SamplingParams(), 0.0,
                   output_token_ids=[rng.randrange(32000) for _ in range(output)])
    seq.block_table = list(range(first_block, first_block + -(-seq.num_tokens // BLOCK_SIZE)))
    return seq


def per_call_ms(repeat: int, fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat * 1e3


def time_batch(batch: int, rng: random.Random, context: int, prefill: int, repeat: int
               ) -> tuple[float, float, float]:
    """Ms for `batch` decodes: a graph replay's inputs written whole (a new batch), the same
    a step later (`GraphInputs`: each sequence one token longer, a block more every
    BLOCK_SIZE tokens), and an eager step's inputs with a `prefill`-token chunk."""
    width = -(-max(context + repeat + 1, prefill) // BLOCK_SIZE)
    decodes, block = [], 0
    for i in range(batch):
        tokens = rng.randrange(2, context)
        output = rng.randrange(1, min(300, tokens))
        seq = make_sequence(f"d{i}", rng, tokens - output, output, block)
        seq.num_computed_tokens = seq.num_tokens - 1
        decodes.append(seq)
        block += len(seq.block_table) + repeat  # room to grow
    prompt = make_sequence("p", rng, prefill, 0, block)
    out = SchedulerOutput(decodes=decodes, prefills=[(prompt, prefill)])
    host = np.empty(batch * (4 + width), np.int64)  # the graph's buffer for this batch
    columns, tables = host[: 4 * batch].reshape(4, batch), host[4 * batch:].reshape(batch, width)
    scratch = block
    whole = per_call_ms(repeat, fill_decode_inputs, columns, tables, decodes, BLOCK_SIZE,
                        scratch)
    eager = per_call_ms(repeat, step_inputs, out, BLOCK_SIZE, scratch, width)
    graph = GraphInputs(columns, tables, BLOCK_SIZE, scratch)
    graph.fill(decodes)
    spent = 0.0
    for _ in range(repeat):
        for seq in decodes:  # the step before sampled a token for each
            seq.output_token_ids.append(1)
            seq.num_computed_tokens += 1
            if seq.num_tokens > len(seq.block_table) * BLOCK_SIZE:
                seq.block_table.append(seq.block_table[-1] + 1)
        start = time.perf_counter()
        graph.fill(decodes)
        spent += time.perf_counter() - start
    return whole, spent / repeat * 1e3, eager


def time_detokenizing(batch: int, rng: random.Random, output: int, repeat: int) -> float:
    """Ms to detokenize one new token of each of `batch` outputs already `output` long."""
    arch = SYNTH_ARCHS["llama-3-8b"]
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_tokenizer(Path(tmp), arch)
        tokenizer = Tokenizer(Path(tmp), arch)
    text_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 50,
                                add_special_tokens=False)
    streams = [IncrementalDetokenizer(tokenizer) for _ in range(batch)]
    for stream in streams:
        for token in text_ids[:output]:
            stream.add(token)

    def one_token_each() -> None:
        token = text_ids[rng.randrange(len(text_ids))]
        for stream in streams:
            stream.add(token)

    return per_call_ms(repeat, one_token_each)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=4000, help="Longest decode context (tokens).")
    ap.add_argument("--prefill", type=int, default=2048, help="Prompt tokens of the eager step.")
    ap.add_argument("--output", type=int, default=500, help="Output tokens before the timed one.")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"| decodes | graph replay's inputs: a new batch | the next step | eager step's, "
          f"with a {args.prefill}-token prompt chunk | detokenizing a token each (outputs of "
          f"{args.output}) |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        whole_ms, next_ms, eager_ms = time_batch(batch, rng, args.context, args.prefill,
                                                 args.repeat)
        detok_ms = time_detokenizing(batch, rng, args.output, args.repeat)
        print(f"| {batch} | {whole_ms:.2f} ms | {next_ms:.2f} ms | {eager_ms:.2f} ms "
              f"| {detok_ms:.2f} ms |")


if __name__ == "__main__":
    main()
