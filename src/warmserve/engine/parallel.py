"""Tensor parallelism across processes: one rank drives, the others follow.

An instance split over `size` devices runs one process per device, each holding one `Shard`
of the weights. Rank 0, the driver, holds the scheduler, the block manager and the sampler;
it builds each step's inputs in host memory and sends them to the other ranks over a CPU
group (gloo). Every rank then runs the step on its shard of the weights and of the KV cache
(its share of the KV heads, in the same blocks), and the row-parallel layers sum their partial
outputs over the device group (NCCL on CUDA, gloo on CPU), so every rank ends the step with
the same hidden states. A follower decides nothing: it runs what it receives (`follow`) until
the driver sends the end.

An instance's groups are its own: its processes meet in a key-value store under the
instance's name (`TensorParallel.join`), and need no `torch.distributed` world. A universal
worker serves one split instance today and another, with other partners, tomorrow, and a
worker that died and was replaced joins the next instance like any other.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from warmserve.engine.runner import ModelRunner

JOIN_TIMEOUT_S = 60.0  # every rank of an instance arrives within this, or joining fails
STEP_WAIT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Shard:
    """Which part of a model's weights a device holds: `rank` of `size` equal parts."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.size & (self.size - 1):
            raise ValueError(f"tensor_parallel={self.size}: a model splits over a power of two "
                             "of devices")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of a model split {self.size} ways")

    @property
    def whole(self) -> bool:
        return self.size == 1

    def __str__(self) -> str:
        return f"{self.rank}/{self.size}"


class TensorParallel:
    """This process's place in one tensor-parallel instance: its shard, the CPU group that
    carries the driver's steps, and the device group the forward's sums run over."""

    def __init__(self, shard: Shard, control: dist.Backend, devices: dist.Backend) -> None:
        self.shard = shard
        self.control = control
        self.devices = devices

    @classmethod
    def join(cls, store: dist.Store, instance: str, shard: Shard, device: torch.device,
             timeout_s: float = JOIN_TIMEOUT_S) -> TensorParallel:
        """Meet the instance's other ranks in `store` under the key prefix `instance` (fresh
        for each instance): blocks until all `shard.size` ranks have called it, or fails
        after `timeout_s`. On CUDA the device group's communicator is set up here, outside
        any graph capture."""
        if shard.whole:
            raise ValueError("a model on one device has no group to join")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore(instance, store)
        try:  # all arrive, or the join fails in time; only then are the groups built
            store.set(f"arrived/{shard.rank}", "")
            store.wait([f"arrived/{rank}" for rank in range(shard.size)], timeout)
        except dist.DistStoreError as exc:
            raise TimeoutError(f"{instance}: rank {shard}: the other ranks did not join within "
                               f"{timeout_s:g} s ({exc})") from None
        # Past the join a follower waits for the driver's next step as long as the instance
        # serves (idle for hours, say): a rank that dies breaks the links at once instead.
        control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), shard.rank,
                                        shard.size, STEP_WAIT)
        devices = control
        if device.type == "cuda":
            torch.cuda.set_device(device)
            devices = dist.ProcessGroupNCCL(dist.PrefixStore("devices", store), shard.rank,
                                            shard.size)
        tp = cls(shard, control, devices)
        tp.all_reduce(torch.zeros(1, device=device))  # the device links are up
        return tp

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def size(self) -> int:
        return self.shard.size

    @property
    def is_driver(self) -> bool:
        return self.shard.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (the row-parallel layers' partial outputs)."""
        self.devices.allreduce([tensor]).wait()

    def send(self, message: Any) -> None:
        """The driver's message to every other rank of the instance (they `receive` it)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(message, pickle.HIGHEST_PROTOCOL)),
                                   dtype=torch.uint8)
        self._broadcast(torch.tensor([payload.numel()], dtype=torch.int64))
        self._broadcast(payload)

    def receive(self) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload)
        return pickle.loads(payload.numpy().tobytes())

    def agree_min(self, value: int) -> int:
        """The least of every rank's `value`: what all of them can hold."""
        tensor = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([tensor], options).wait()
        return int(tensor.item())

    def close(self) -> None:
        """Release the groups' connections (the instance has ended)."""
        for group in {id(g): g for g in (self.devices, self.control)}.values():
            group.shutdown()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.control.broadcast([tensor], options).wait()


def follow(runner: ModelRunner, tp: TensorParallel,
           handle: Callable[[Any], None] | None = None) -> int:
    """A follower's loop: run every step the driver sends, and pass anything else it sends
    to `handle`, until it sends the end (its runner's `close`). Returns the steps run."""
    from warmserve.engine.runner import GraphStep, StepInputs

    if tp.is_driver:
        raise ValueError("the driver prepares steps; only the other ranks follow")
    steps = 0
    while (message := tp.receive()) is not None:
        if isinstance(message, GraphStep | StepInputs):
            runner.run(message)
            steps += 1
        elif handle is not None:
            handle(message)
        else:
            raise ValueError(f"a follower cannot handle {type(message).__name__}")
    return steps
