"""Tensor parallelism across processes: one rank drives, the others follow.

An instance split over `size` devices runs one process per device. Rank 0, the driver,
holds the scheduler, the block manager and the sampler; it builds each step's inputs in host
memory and sends them to the other ranks over a CPU group (gloo). Every rank then runs the
step on its shard of the weights and of the KV cache (its share of the KV heads, in the same
blocks), and the row-parallel layers sum their partial outputs over the device group (NCCL on
CUDA, gloo on CPU), so every rank ends the step with the same hidden states. A follower
decides nothing: it runs what it receives (`follow`) until the driver sends the end.

The processes join one `torch.distributed` world before any of this; `TensorParallel.create`
makes the groups of one instance out of it, and every process of the world must call it for
every group, in the same order (torch's rule for new groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from warmserve.engine.runner import ModelRunner


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in one tensor-parallel instance."""

    rank: int  # within the instance; 0 drives
    ranks: tuple[int, ...]  # the world ranks of the instance's processes, its driver first
    devices: dist.ProcessGroup  # the forward's collectives
    control: dist.ProcessGroup  # the driver's step inputs, as objects on the CPU

    @classmethod
    def create(cls, ranks: tuple[int, ...], device_type: str) -> TensorParallel | None:
        """The groups of the instance over `ranks` (world ranks). Every process of the world
        calls this with the same `ranks`; those outside get None."""
        if len(set(ranks)) != len(ranks) or len(ranks) & (len(ranks) - 1):
            raise ValueError(f"ranks {ranks}: a tensor-parallel group is a power of two of "
                             "distinct processes")
        control = dist.new_group(list(ranks), backend="gloo")
        devices = (dist.new_group(list(ranks), backend="nccl") if device_type == "cuda"
                   else control)
        me = dist.get_rank()
        if me not in ranks:
            return None
        return cls(ranks.index(me), tuple(ranks), devices, control)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def send(self, message: Any) -> None:
        """The driver's message to every other rank of the instance (they `receive` it)."""
        dist.broadcast_object_list([message], group=self.control, group_src=0)

    def receive(self) -> Any:
        box = [None]
        dist.broadcast_object_list(box, group=self.control, group_src=0)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The least of every rank's `value`: what all of them can hold."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())


def follow(runner: ModelRunner, tp: TensorParallel) -> int:
    """A follower's loop: run every step the driver sends, until it sends the end (its
    runner's `close`). Returns the steps run."""
    if tp.is_driver:
        raise ValueError("the driver prepares steps; only the other ranks follow")
    steps = 0
    while (step := tp.receive()) is not None:
        runner.run(step)
        steps += 1
    return steps
