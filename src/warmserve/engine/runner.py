"""The model runner: turns a `SchedulerOutput` into tensors, runs the model, samples.

It never decides anything. On CUDA, pure-decode steps replay CUDA graphs captured per batch
bucket over fixed-shape buffers; padded rows write into a scratch block past the blocks the
block manager hands out, so they never touch a sequence's cache.

A step is built in host memory first (`prepare`: a `GraphStep` or a `StepInputs`), then run.
In a tensor-parallel instance the driver's runner sends what it built to the other ranks,
whose runners `run` it on their shards (engine/parallel.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from warmserve.engine.layers import triton_decode
from warmserve.engine.layers.attention import AttentionMetadata, PrefillSpan
from warmserve.engine.sampling import SampledToken, Sampler
from warmserve.engine.scheduler import SchedulerOutput
from warmserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from warmserve.engine.parallel import TensorParallel

log = logging.getLogger(__name__)

# One graph capture at a time in a process. Two runners built at once (a worker reloading
# several models) broke each other: one's synchronize, legal on its own, is illegal while the
# other's stream is capturing, and invalidates that capture (seen live, 2026-11-28).
_CAPTURE_LOCK = threading.Lock()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, V] output buffer


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, block_size: int,
                 max_blocks_per_seq: int, scratch_block: int, use_cuda_graphs: bool = False,
                 max_graph_batch: int = 64, seed: int = 0,
                 tp: TensorParallel | None = None) -> None:
        self.model = model
        self.tp = tp  # a tensor-parallel rank; the driver sends every step to the others
        self.kv_cache = kv_cache  # [num_blocks + 1, L, 2, bs, Hkv, D]; the last is scratch
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.device = kv_cache.device
        self.sampler = Sampler(self.device, seed)
        self._graphs: dict[int, _Graph] = {}
        can_graph = (
            use_cuda_graphs and self.device.type == "cuda"
            and triton_decode.available()
            and triton_decode.supports(block_size, model.arch.head_dim)
        )
        if can_graph:
            self._capture_graphs(max_graph_batch)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, sample_seqs: list[Sequence]) -> list[SampledToken]:
        """Run one step; sample a token for each of `sample_seqs` (in that order)."""
        step = self.prepare(out)
        if self.tp is not None:
            self.tp.send(step)
        if isinstance(step, GraphStep):
            logits = self._replay(step.bucket)
            row_of = {seq.request_id: i for i, seq in enumerate(out.decodes)}
            logits = logits[[row_of[s.request_id] for s in sample_seqs]]
        else:
            hidden = self._forward(step)
            if not sample_seqs:
                return []
            rows = [step.row_of[s.request_id] for s in sample_seqs]
            logits = self.model.compute_logits(hidden[rows])
        return self.sampler.sample(
            logits, [s.params for s in sample_seqs], [s.generator for s in sample_seqs]
        )

    def prepare(self, out: SchedulerOutput) -> GraphStep | StepInputs:
        """A step's inputs in host memory: a decode graph's, or an eager step's."""
        bucket = None if out.prefills else self._bucket(len(out.decodes))
        if bucket is None:
            return step_inputs(out, self.block_size, self.scratch_block, self.max_blocks_per_seq)
        self._inputs.fill(out.decodes)
        return GraphStep(bucket, self._inputs.columns[:, :bucket], self._inputs.tables[:bucket])

    @torch.inference_mode()
    def run(self, step: GraphStep | StepInputs) -> None:
        """Run a step another rank prepared (a tensor-parallel follower): the model's
        collectives meet the other ranks'; nothing is sampled."""
        if isinstance(step, GraphStep):
            self._inputs.columns[:, :step.bucket] = step.columns
            self._inputs.tables[:step.bucket] = step.tables
            self._replay(step.bucket)
        else:
            self._forward(step)

    def close(self) -> None:
        """A tensor-parallel driver tells the other ranks that no step follows."""
        if self.tp is not None and self.tp.is_driver:
            self.tp.send(None)

    def _forward(self, host: StepInputs) -> torch.Tensor:
        spans = [PrefillSpan(row, n, start, self._to_device(table))
                 for row, n, start, table in host.prefills]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(host.slots),
            num_decodes=len(host.decode_lens),
            decode_block_tables=self._to_device(host.decode_tables),
            decode_context_lens=self._to_device(host.decode_lens),
            prefills=spans,
        )
        return self.model(self._to_device(host.ids), self._to_device(host.positions),
                          self.kv_cache, meta)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    # --- CUDA graphs for decode -------------------------------------------------------------

    def _bucket(self, batch: int) -> int | None:
        return next((b for b in sorted(self._graphs) if b >= batch), None)

    def _capture_graphs(self, max_batch: int) -> None:
        # All decode inputs live in one int64 buffer, filled by one host-to-device copy a step:
        # [ids | positions | slots | context lens | block tables (n x w)].
        n, w = max_batch, self.max_blocks_per_seq
        self._host = torch.empty(n * (4 + w), dtype=torch.int64, pin_memory=True)
        self._static = torch.empty_like(self._host, device=self.device)
        self._ids, self._pos, self._slot, self._lens = self._static[: 4 * n].view(4, n)
        self._tables = self._static[4 * n:].view(n, w)
        host = self._host.numpy()
        self._inputs = GraphInputs(host[: 4 * n].reshape(4, n), host[4 * n:].reshape(n, w),
                                   self.block_size, self.scratch_block)
        self._static.copy_(self._host)
        buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
                          if b < max_batch} | {max_batch}, reverse=True)
        stream = torch.cuda.current_stream(self.device)  # only this thread's work is waited on
        with _CAPTURE_LOCK:
            pool = torch.cuda.graph_pool_handle()
            for bucket in buckets:
                meta = AttentionMetadata(self._slot[:bucket], bucket, self._tables[:bucket],
                                         self._lens[:bucket], [])
                with torch.inference_mode():
                    for _ in range(2):  # warm up (Triton compile, cuBLAS handles)
                        self._decode_forward(bucket, meta)
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: other engines of the worker keep running while this captures
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        logits = self._decode_forward(bucket, meta)
                self._graphs[bucket] = _Graph(graph, logits)
            stream.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sorted(self._graphs))

    def _decode_forward(self, bucket: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self._ids[:bucket], self._pos[:bucket], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    def _replay(self, bucket: int) -> torch.Tensor:
        """Replay a bucket's graph over the inputs in the host buffer; its logits [bucket, V]."""
        self._static.copy_(self._host, non_blocking=True)
        self._graphs[bucket].graph.replay()
        return self._graphs[bucket].logits


@dataclass
class GraphStep:
    """A decode step that replays the graph of `bucket`: the first `bucket` rows of the
    graphs' inputs (`fill_decode_inputs`' layout), padding rows included. On the driver they
    are views of its buffer; sent to another rank, they are copied into its own."""

    bucket: int
    columns: np.ndarray  # [4, bucket]: token ids, positions, cache slots, context lengths
    tables: np.ndarray  # [bucket, max_blocks_per_seq]


@dataclass
class StepInputs:
    """An eager step's inputs in host memory (int64), the decodes' tokens first."""

    ids: np.ndarray  # [T] token ids
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] cache slot of each token: block * block_size + offset
    decode_lens: np.ndarray  # [B] context lengths, the new token included
    decode_tables: np.ndarray  # [B, max_blocks_per_seq], padded with the scratch block
    # each prefill chunk: its first row, its tokens, the tokens cached before it, its block table
    prefills: list[tuple[int, int, int, np.ndarray]]
    row_of: dict[str, int]  # request id -> the row whose hidden state samples its next token


def step_inputs(out: SchedulerOutput, block_size: int, scratch_block: int, width: int
                ) -> StepInputs:
    """The inputs of a step that runs eagerly (a prompt beside the decodes, or more decodes
    than the largest graph). The decodes' block tables have the graphs' width and dtype
    whatever the contexts: Triton compiles a variant of the decode kernels per width class
    (its partition count, the width's divisibility) and per dtype, each in the first step
    that needs it (0.1-1 s on an H200, docs/engine.md); so the capture compiles the only one."""
    num_decodes = len(out.decodes)
    columns = np.empty((4, num_decodes), np.int64)
    tables = np.empty((num_decodes, width), np.int64)
    fill_decode_inputs(columns, tables, out.decodes, block_size, scratch_block)
    ids, positions, slots = [columns[0]], [columns[1]], [columns[2]]
    row_of = {seq.request_id: row for row, seq in enumerate(out.decodes)}
    prefills, row = [], num_decodes
    for seq, n in out.prefills:
        start = seq.num_computed_tokens
        pos = np.arange(start, start + n)
        table = np.asarray(seq.block_table, np.int64)
        ids.append(np.asarray(seq.token_ids(start, start + n), np.int64))
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        prefills.append((row, n, start, table))
        row += n
        row_of[seq.request_id] = row - 1
    return StepInputs(np.concatenate(ids), np.concatenate(positions), np.concatenate(slots),
                      columns[3], tables, prefills, row_of)


class GraphInputs:
    """The decode graphs' inputs in host memory (`fill_decode_inputs`' layout), rewritten
    step after step. Copying every block table into its row was most of a step's host time
    at large batches (about 65 ns an entry on the development machine); a table only grows
    between preemptions, and a running batch keeps its order, so a row that holds the same
    sequence since the same preemption only takes the blocks added since."""

    def __init__(self, columns: np.ndarray, tables: np.ndarray, block_size: int,
                 scratch_block: int) -> None:
        self.columns, self.tables = columns, tables  # [4, N], [N, W]
        self.block_size, self.scratch_block = block_size, scratch_block
        # per row: (the sequence, its preemption count, the blocks of its table written)
        self._held: list[tuple[Sequence, int, int] | None] = [None] * tables.shape[0]
        fill_decode_inputs(columns, tables, [], block_size, scratch_block)

    def fill(self, decodes: list[Sequence]) -> None:
        _write_columns(self.columns, decodes, self.block_size)
        for i, seq in enumerate(decodes):
            held, blocks = self._held[i], len(seq.block_table)
            if (held is not None and held[0] is seq and held[1] == seq.num_preemptions
                    and held[2] <= blocks):
                self.tables[i, held[2]:blocks] = seq.block_table[held[2]:]
            else:
                self.tables[i, :blocks] = seq.block_table
                self.tables[i, blocks:] = self.scratch_block
            self._held[i] = (seq, seq.num_preemptions, blocks)
        for i in range(len(decodes), len(self._held)):  # padding rows: the scratch block
            if self._held[i] is not None:
                self.columns[:, i] = (0, 0, self.scratch_block * self.block_size, 1)
                self.tables[i] = self.scratch_block
                self._held[i] = None


def fill_decode_inputs(columns: np.ndarray, tables: np.ndarray, decodes: list[Sequence],
                       block_size: int, scratch_block: int) -> None:
    """Write one decode token's inputs per sequence: `columns` [4, N] takes token ids,
    positions, cache slots and context lengths, `tables` [N, W] the block tables padded with
    the scratch block. Rows past `decodes` (a graph's padding) decode a dummy token into the
    scratch block."""
    columns[:] = np.array([0, 0, scratch_block * block_size, 1])[:, None]
    tables[:] = scratch_block
    _write_columns(columns, decodes, block_size)
    for row, seq in zip(tables, decodes, strict=False):
        row[: len(seq.block_table)] = seq.block_table


def _write_columns(columns: np.ndarray, decodes: list[Sequence], block_size: int) -> None:
    """The first len(decodes) entries of each column: token id, position, slot, length."""
    n = len(decodes)
    positions = [seq.num_computed_tokens for seq in decodes]
    ids, pos, slots, lens = columns[:, :n]
    pos[:] = positions
    lens[:] = pos + 1
    ids[:] = [seq.token_ids(p, p + 1)[0] for seq, p in zip(decodes, positions, strict=True)]
    slots[:] = [seq.block_table[p // block_size] * block_size + p % block_size
                for seq, p in zip(decodes, positions, strict=True)]
