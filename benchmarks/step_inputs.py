"""Host time to build one engine step's inputs: the Python and numpy work before the GPU runs
(a step's sampling syncs with the host, so none of it overlaps the GPU's work).

    python benchmarks/step_inputs.py
    python benchmarks/step_inputs.py --batches 1,64,256 --context 4000 --prefill 2048

For each batch of decoding sequences (contexts drawn up to `--context` tokens, as prompt plus
output) it times the inputs of a graph replay (`fill_decode_inputs`, into the graph's buffer)
and of an eager step with a `--prefill`-token prompt chunk beside the decodes (`step_inputs`).
Needs no GPU. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from warmserve.engine.runner import fill_decode_inputs, step_inputs
from warmserve.engine.sampling import SamplingParams
from warmserve.engine.scheduler import SchedulerOutput
from warmserve.engine.sequence import Sequence

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
               ) -> tuple[float, float]:
    """(graph replay's inputs, eager step's inputs) for `batch` decodes, in ms."""
    width = -(-max(context, prefill) // BLOCK_SIZE)
    decodes, block = [], 0
    for i in range(batch):
        tokens = rng.randrange(2, context)
        output = rng.randrange(1, min(300, tokens))
        seq = make_sequence(f"d{i}", rng, tokens - output, output, block)
        seq.num_computed_tokens = seq.num_tokens - 1
        decodes.append(seq)
        block += len(seq.block_table)
    prompt = make_sequence("p", rng, prefill, 0, block)
    out = SchedulerOutput(decodes=decodes, prefills=[(prompt, prefill)])
    host = np.empty(batch * (4 + width), np.int64)  # the graph's buffer for this batch
    columns, tables = host[: 4 * batch].reshape(4, batch), host[4 * batch:].reshape(batch, width)
    scratch = block
    return (per_call_ms(repeat, fill_decode_inputs, columns, tables, decodes, BLOCK_SIZE,
                        scratch),
            per_call_ms(repeat, step_inputs, out, BLOCK_SIZE, scratch, width))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=4000, help="Longest decode context (tokens).")
    ap.add_argument("--prefill", type=int, default=2048, help="Prompt tokens of the eager step.")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"| decodes | graph replay's inputs | eager step's, with a {args.prefill}-token "
          "prompt chunk |")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        graph_ms, eager_ms = time_batch(batch, rng, args.context, args.prefill, args.repeat)
        print(f"| {batch} | {graph_ms:.2f} ms | {eager_ms:.2f} ms |")


if __name__ == "__main__":
    main()
