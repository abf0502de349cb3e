"""The simulator's clock and event heap, shared by the request flow and the capacity manager."""

from __future__ import annotations

import heapq
import math

FINISH, READY, TICK, WINDOW, EXPIRE = range(5)  # event kinds


class EventQueue:
    """Events ordered by time, then by insertion (deterministic); `now` is the simulated time
    of the event (or arrival) being handled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []  # (time, seq, kind, payload)
        self._seq = 0

    def push(self, t: float, kind: int, obj: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    def next_time(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[int, object]:
        """The next event's kind and payload; the clock moves to its time."""
        t, _, kind, obj = heapq.heappop(self._heap)
        self.now = t
        return kind, obj
