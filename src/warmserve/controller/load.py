"""What the live controller knows of each model's load: its concurrency at the router, and the
prefill work its engines are given, measured from their counters (EngineStats)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

COUNTERS = ("prompt_tokens", "prefill_tokens", "prefill_s", "busy_s", "finished")


@dataclass
class EngineWork:
    """A model's engine counters (prompt tokens added and prefilled, prefill and busy
    seconds, requests finished) summed over its workers since the controller started. An
    engine starts its counters at zero: a worker where the model stopped being active is
    forgotten, so its next engine counts from there."""

    last: dict[str, tuple] = field(default_factory=dict)  # worker name -> counters seen
    total: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    def update(self, entries: dict[str, dict]) -> None:
        """`entries`: the model's stats entry on each worker where it is active."""
        for name in list(self.last):
            if name not in entries:
                del self.last[name]
        for name, entry in entries.items():
            seen = tuple(entry.get(k, 0) for k in COUNTERS)
            before = self.last.get(name, (0,) * len(COUNTERS))
            for key, now, then in zip(COUNTERS, seen, before, strict=True):
                self.total[key] += now - then if now >= then else now  # a new engine: from 0
            self.last[name] = seen

    @property
    def prefill_s_per_token(self) -> float:
        t = self.total
        return t["prefill_s"] / t["prefill_tokens"] if t["prefill_tokens"] else 0.0

    @property
    def gpu_s_per_request(self) -> float:
        """Engine seconds per finished request (one GPU per worker)."""
        t = self.total
        return t["busy_s"] / t["finished"] if t["finished"] else 0.0


def _trim(samples: deque, now: float, window_s: float) -> None:
    while samples and samples[0][0] < now - window_s:
        samples.popleft()


@dataclass
class ModelLoad:
    """One model's load as the controller samples it, tick by tick."""

    samples: deque = field(default_factory=deque)  # (time, concurrency), load_window_s long
    window_samples: list = field(default_factory=list)  # (time, concurrency), this window
    arrived: int = 0  # requests routed to the model since the controller started
    window_start_arrived: int = 0  # `arrived` when this forecast window opened
    activated_at: dict[str, float] = field(default_factory=dict)  # worker name -> time
    busy_at: dict[str, float] = field(default_factory=dict)  # worker name -> last time busy
    load: float = 0.0  # the autoscaler's load of the last tick
    recent: deque = field(default_factory=deque)  # for policies.peak_recent_load
    peak: float = 0.0  # the peak load of the last rebalance_reserve_s: what rebalancing
    # judges this model's surplus against
    work: EngineWork = field(default_factory=EngineWork)
    arrival_samples: deque = field(default_factory=deque)  # (time, arrived)
    recent_rates: deque = field(default_factory=deque)  # for policies.peak_recent_load
    peak_rate: float = 0.0  # the peak arrival rate of the last rebalance_reserve_s
    prompt_samples: deque = field(default_factory=deque)  # (time, prompt tokens added)
    prefill: float = 0.0  # instances' worth of prefill time arriving, over load_window_s
    recent_prefill: deque = field(default_factory=deque)
    peak_prefill: float = 0.0

    def sample_concurrency(self, now: float, concurrency: int, window_s: float) -> float:
        """Record this tick's concurrency; the mean over the last `window_s`."""
        self.samples.append((now, concurrency))
        self.window_samples.append((now, concurrency))
        _trim(self.samples, now, window_s)
        return sum(c for _, c in self.samples) / len(self.samples)

    @property
    def arrivals(self) -> int:
        """Requests that arrived in this forecast window."""
        return self.arrived - self.window_start_arrived

    def close_window(self) -> None:
        self.window_samples = []
        self.window_start_arrived = self.arrived

    def sample_arrivals(self, now: float, window_s: float) -> float:
        """Requests per second that arrived over the last `window_s` (at the start, as if
        none came before: a short span would make a few requests look like a rush)."""
        self.arrival_samples.append((now, self.arrived))
        _trim(self.arrival_samples, now, window_s)
        return (self.arrived - self.arrival_samples[0][1]) / window_s

    def sample_prefill(self, now: float, window_s: float) -> float:
        """Instances' worth of prefill arriving over the last `window_s`: the prompt tokens
        the model's engines were given per second, times the seconds a token's prefill has
        taken them (the simulator's signal, measured; `work` updated first)."""
        self.prompt_samples.append((now, self.work.total["prompt_tokens"]))
        _trim(self.prompt_samples, now, window_s)
        first_t, first_tokens = self.prompt_samples[0]
        span = now - first_t
        if span <= 0:
            return 0.0
        tokens_per_s = (self.work.total["prompt_tokens"] - first_tokens) / span
        return tokens_per_s * self.work.prefill_s_per_token

    def judged(self, lookback: bool) -> tuple[float, float]:
        """The load and prefill work rebalancing judges the model by (as the simulator)."""
        if lookback:
            return max(self.peak, self.load), max(self.peak_prefill, self.prefill)
        return self.load, self.prefill
