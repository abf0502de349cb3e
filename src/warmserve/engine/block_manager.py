"""KV-cache block accounting: a free list, per-sequence block tables, and lending.

The block count can shrink and grow at run time: `lend` takes free blocks out of service (the
worker gives their memory to prewarmed models) and `reclaim` brings them back. Lending takes
only free blocks, never one a sequence holds, and prefers the highest block ids so that the
memory lent sits at the end of the cache region.
"""

from __future__ import annotations

import heapq

from warmserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks  # all blocks of the cache region, lent or not
        self._free: list[int] = list(range(num_blocks))  # min-heap: low ids are used first
        self._lent: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_lent_blocks(self) -> int:
        return len(self._lent)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks in service (free or held by sequences)."""
        return self.num_blocks - len(self._lent)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_new_tokens` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"need {needed} blocks, {len(self._free)} free")
        seq.block_table.extend(heapq.heappop(self._free) for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            heapq.heappush(self._free, block)
        seq.block_table.clear()

    def can_lend(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free)

    def lend(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks out of service (highest ids first) and return them."""
        if not self.can_lend(num_blocks):
            raise ValueError(f"cannot lend {num_blocks} blocks: {len(self._free)} are free")
        taken = heapq.nlargest(num_blocks, self._free)
        taken_set = set(taken)
        self._free = [b for b in self._free if b not in taken_set]
        heapq.heapify(self._free)
        self._lent |= taken_set
        return sorted(taken)

    def free_units(self, unit: int) -> list[int]:
        """Indexes of the lending units (`unit` consecutive blocks, whole pages of memory) whose
        blocks are all free, highest first."""
        free = set(self._free)
        return [u for u in range(self.num_blocks // unit - 1, -1, -1)
                if all(b in free for b in range(u * unit, (u + 1) * unit))]

    def lend_units(self, count: int, unit: int) -> list[int]:
        """Take `count` whole units of free blocks out of service; returns their block ids."""
        units = self.free_units(unit)
        if count > len(units):
            raise ValueError(f"cannot lend {count} units of {unit} blocks: {len(units)} are free")
        blocks = [b for u in units[:count] for b in range(u * unit, (u + 1) * unit)]
        chosen = set(blocks)
        self._free = [b for b in self._free if b not in chosen]
        heapq.heapify(self._free)
        self._lent |= chosen
        return sorted(blocks)

    def withhold(self, blocks: list[int]) -> None:
        """Take specific free blocks out of service (their memory is not there yet)."""
        wanted = set(blocks)
        if not wanted <= set(self._free):
            raise ValueError(f"blocks {sorted(wanted - set(self._free))[:8]} are not free")
        self._free = [b for b in self._free if b not in wanted]
        heapq.heapify(self._free)
        self._lent |= wanted

    def reclaim(self, blocks: list[int]) -> None:
        """Return lent blocks to service."""
        unknown = [b for b in blocks if b not in self._lent]
        if unknown:
            raise ValueError(f"blocks {unknown[:8]} were not lent")
        for block in blocks:
            self._lent.discard(block)
            heapq.heappush(self._free, block)
