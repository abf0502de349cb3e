"""Continuous batching: which sequences run this step, and how many tokens each.

Each step has a token budget. Running sequences go first, in arrival order (decodes take one
token, a prompt split by chunked prefill takes its next chunk); waiting sequences are admitted
in arrival order with what budget is left. When the KV cache runs out, the most recently
admitted running sequence is preempted by recompute: its blocks are freed and it goes back to
the front of the waiting queue. The scheduler never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from warmserve.engine.block_manager import BlockManager
from warmserve.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The one message from the scheduler to the model runner."""

    decodes: list[Sequence] = field(default_factory=list)  # one new token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, chunk tokens)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences that cannot fit in the whole KV cache even alone; finished with LENGTH.
    evicted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def scheduled(self) -> list[tuple[Sequence, int]]:
        return [(seq, 1) for seq in self.decodes] + self.prefills

    def sequences_to_sample(self) -> list[Sequence]:
        """Sequences whose scheduled tokens reach their end: each gets a new token."""
        return [s for s, n in self.scheduled() if s.num_computed_tokens + n == s.num_tokens]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_tokens_per_step: int
                 ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Waiting sequences the last schedule could not admit for want of free KV blocks (not
        # for want of batch slots or step budget): what tells a controller to take lent
        # blocks back.
        self.num_blocked = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a sequence (done, aborted or failed) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.finish(reason)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_tokens_per_step)
        self.num_blocked = 0
        if out.preempted:  # preempted for want of blocks: all that wait are short of them
            self.num_blocked = len(self.waiting)
        else:
            self._schedule_waiting(out, budget)
        return out

    def postprocess(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts after the runner has executed `out`."""
        for seq, n in out.scheduled():
            seq.num_computed_tokens += n

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, n, out):
                continue  # seq itself was preempted or evicted; running shrank
            self.block_manager.allocate(seq, n)
            budget -= n
            if seq.num_computed_tokens and n == 1 and seq.num_uncomputed_tokens == 1:
                out.decodes.append(seq)
            else:
                out.prefills.append((seq, n))
            index += 1
        return budget

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of `running` until `seq` can grow by n; False if seq left.
        Alone and still short, seq is cut for length only if the whole cache could not hold
        it; if it could once its lent blocks come back, it waits for them (preempted)."""
        bm = self.block_manager
        while not bm.can_allocate(seq, n):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                if len(seq.block_table) + bm.blocks_needed(seq, n) > bm.num_blocks:
                    self.finish(seq, FinishReason.LENGTH)
                    out.evicted.append(seq)
                    return False
                self._preempt(seq)
                out.preempted.append(seq)
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _needs_lent_blocks(self, seq: Sequence) -> bool:
        """Whether `seq` cannot finish its prompt on the blocks in service, but could once the
        lent ones come back. Admitted chunk by chunk, it would run out at the same point again
        and again, each time recomputed; it waits instead (and counts as blocked)."""
        bm = self.block_manager
        need = -(-seq.num_tokens // bm.block_size)
        return bm.num_usable_blocks < need <= bm.num_blocks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n) or self._needs_lent_blocks(seq):
                self.num_blocked = len(self.waiting)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.allocate(seq, n)
            out.prefills.append((seq, n))
            budget -= n
