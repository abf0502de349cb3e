"""Multi-model workloads built from real traces, the way the paper builds them.

N models share a total rate R by a power law (share_i ∝ (i+1)^-α). Each model follows its own
period ("day") of a multi-day trace, time-compressed by `time_scale` (trace seconds per
simulated second). Two arrival processes:

- `arrivals="clients"`: ServeGen's per-client processes. In each 10-minute window every active
  client sends requests with the inter-arrival distribution ServeGen fitted for it (Gamma,
  Weibull or exponential, with its shape; the mean is the client's rate), so bursts come from
  the trace's own clients. The per-client rates are scaled so that the model's mean over the 14
  days is its share of R.
- `arrivals="azure"`: the arrival times of the Azure LLM inference trace (one real hour, looped
  from a per-model offset) thinned to a rate envelope: ServeGen's per-model aggregate, one day
  of an Azure Functions function, or flat.

Token lengths come from the Azure LLM inference trace 2023 (conv or code) — the only trace
with LLM token lengths for these models. Each model's earlier periods are built the same way
and summarised per forecast window: that is the history the forecaster learns from. Everything
is seeded and reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from warmserve.workload.traces import (
    SERVEGEN_WINDOW_S,
    SERVEGEN_WINDOWS,
    LLMTrace,
    load_azure_functions,
    load_azure_llm,
    load_servegen_clients,
    load_servegen_rates,
)

DAY_S = 86400.0
SERVEGEN_SERIES = ("m-large", "m-mid", "m-small")
# The most requests (rate x duration) a workload may hold: 23x `scale`, some 11 minutes of
# simulation per policy; beyond it a typo in a rate would exhaust memory before saying so
MAX_REQUESTS = 50_000_000
RECENT_DAYS = 3  # days of history drawn from the workload's own stream (the presets' default)
MAX_HISTORY_DAYS = 13  # ServeGen's 14 days, less the simulated one
MAX_WINDOWS = 20_000  # forecast windows in the span: a day in 5-second windows is 17,280
# (model index, input tokens, output tokens) -> how long a request stays in the system (s)
ServiceTime = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def default_service_time(model: int, input_tokens: np.ndarray, output_tokens: np.ndarray
                         ) -> np.ndarray:
    """A request's duration when no cost profile is given: 0.1 ms/prompt token, 10 ms/token."""
    return 1e-4 * input_tokens + 0.010 * output_tokens


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build a workload; presets are instances of this."""

    models: tuple[str, ...]
    total_rate_rps: float
    duration_s: float
    alpha: float = 1.0
    lengths: str = "conv"  # the Azure LLM trace giving token lengths (and azure arrivals)
    arrivals: str = "azure"  # azure (trace times thinned to the shape) | clients (ServeGen)
    shape: str = "servegen"  # servegen | functions | mixed (alternating) | flat
    time_scale: float = 72.0  # trace seconds per simulated second (72: a day in 20 minutes)
    start_hour: float = 6.0  # time of day (trace) at which the simulated period starts
    # earlier days of each model's history (ServeGen's 14 days hold 13 before any day)
    history_periods: int = 3
    # every earlier period replays the simulated period's own trace day (with fresh
    # randomness): a load whose days repeat, to study forecasting where it can work. With
    # azure arrivals each draw loops the Azure hour from its own offset, and that hour's own
    # swings in rate come with it; client arrivals repeat the day's clients alone
    repeat_day: bool = False
    input_cap: int = 1024
    window_s: float = 60.0  # forecast window, simulated seconds
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a workload needs at least one model")
        for name, value in (("total_rate_rps", self.total_rate_rps),
                            ("duration_s", self.duration_s), ("time_scale", self.time_scale),
                            ("window_s", self.window_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a finite number > 0")
        if self.total_rate_rps * self.duration_s > MAX_REQUESTS:
            raise ValueError(f"total_rate_rps={self.total_rate_rps} x duration_s="
                             f"{self.duration_s} is {self.total_rate_rps * self.duration_s:.3g} "
                             f"requests, more than the {MAX_REQUESTS:,} a workload may hold")
        if self.duration_s / self.window_s > MAX_WINDOWS:
            raise ValueError(f"duration_s={self.duration_s} / window_s={self.window_s} is "
                             f"{self.duration_s / self.window_s:.3g} forecast windows, more "
                             f"than the {MAX_WINDOWS:,} a workload may have")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.shape not in ("servegen", "functions", "mixed", "flat"):
            raise ValueError(f"shape={self.shape!r}: one of servegen, functions, mixed, flat")
        if self.arrivals not in ("azure", "clients"):
            raise ValueError(f"arrivals={self.arrivals!r}: one of azure, clients")
        if self.arrivals == "clients" and self.shape not in ("servegen", "mixed"):
            raise ValueError(f"arrivals='clients' replays ServeGen's clients, so it needs "
                             f"shape='servegen' or 'mixed', not {self.shape!r}")
        if self.lengths not in ("conv", "code"):
            raise ValueError(f"lengths={self.lengths!r}: one of conv, code")
        if not 0 <= self.history_periods <= MAX_HISTORY_DAYS:
            raise ValueError(f"history_periods={self.history_periods}: from 0 to "
                             f"{MAX_HISTORY_DAYS} earlier days (ServeGen holds 14 days)")

    @property
    def period_s(self) -> float:
        """One trace day in simulated seconds."""
        return DAY_S / self.time_scale

    def shares(self) -> np.ndarray:
        weights = (np.arange(len(self.models)) + 1.0) ** -self.alpha
        return weights / weights.sum()


@dataclass(frozen=True)
class WindowSeries:
    """Per-window load of one model: [periods, windows] arrays (period 0 is the oldest)."""

    avg_concurrency: np.ndarray
    peak_concurrency: np.ndarray
    rate_rps: np.ndarray


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    models: tuple[str, ...]
    arrival_s: np.ndarray  # [N] float64, sorted
    model_index: np.ndarray  # [N] int32
    input_tokens: np.ndarray  # [N] int32
    output_tokens: np.ndarray  # [N] int32
    history: dict[str, WindowSeries] = field(default_factory=dict)  # earlier periods
    actual: dict[str, WindowSeries] = field(default_factory=dict)  # the simulated period
    notes: tuple[str, ...] = ()

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)

    @property
    def window_s(self) -> float:
        return self.spec.window_s

    @property
    def num_windows(self) -> int:
        """Forecast windows in the simulated span (and in each history row: the same span of
        an earlier day, so that a row's slot k is the same time of day as window k)."""
        return max(1, int(np.ceil(self.spec.duration_s / self.spec.window_s)))


class _Shapes:
    """Rate multipliers (mean 1 over the source) as functions of trace time, one per model."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self._servegen = load_servegen_rates() if spec.shape in ("servegen", "mixed") else {}
        self.clients = load_servegen_clients() if spec.arrivals == "clients" else {}
        self._functions = (load_azure_functions(top=4 * len(spec.models))
                           if spec.shape in ("functions", "mixed") else None)

    def kind(self, i: int) -> str:
        if self.spec.shape == "mixed":
            return "servegen" if i % 2 == 0 else "functions"
        return self.spec.shape

    def has_history(self, i: int) -> bool:
        return self.kind(i) in ("servegen", "flat")

    def multiplier(self, i: int, trace_s: np.ndarray) -> np.ndarray:
        kind = self.kind(i)
        if kind == "flat":
            return np.ones_like(trace_s)
        if kind == "servegen":
            series = self._servegen[SERVEGEN_SERIES[i % 3]]
            series = series / series.mean()
            centers = (np.arange(len(series)) + 0.5) * SERVEGEN_WINDOW_S
            return np.interp(trace_s % (len(series) * SERVEGEN_WINDOW_S), centers, series)
        counts = self._functions[(i // 2 if self.spec.shape == "mixed" else i)
                                 % len(self._functions)].astype(float)
        counts = counts / max(counts.mean(), 1e-9)
        minute = (trace_s % DAY_S) / 60.0
        return np.interp(minute, np.arange(len(counts)) + 0.5, counts)

    def day_of(self, i: int, period: int) -> float:
        """Trace start (s) of model i's simulated period `period` (0 = the simulated one)."""
        days = 14 if self.kind(i) == "servegen" else 1
        day = (3 + 2 * i + (i // 3)) % days  # different models, different days
        return ((day + period) % days) * DAY_S + self.spec.start_hour * 3600.0


def build_workload(spec: WorkloadSpec, service_time: ServiceTime = default_service_time
                   ) -> Workload:
    """Requests for the simulated period plus each model's per-window history."""
    base = load_azure_llm(spec.lengths)
    shapes = _Shapes(spec)
    rng = np.random.default_rng(spec.seed)
    history_rng = np.random.default_rng([spec.seed, 1])  # the repeated days' draws
    older_rng = np.random.default_rng([spec.seed, 2])  # days before the last three
    shares = spec.shares()
    parts, history, actual = [], {}, {}
    for i, name in enumerate(spec.models):
        clients = spec.arrivals == "clients" and shapes.kind(i) == "servegen"
        requests = _client_requests if clients else _model_requests
        rate = spec.total_rate_rps * shares[i]
        t, n_in, n_out = requests(base, shapes, i, 0, rate, spec, rng)
        parts.append((t, np.full(len(t), i, np.int32), n_in, n_out))
        actual[name] = _window_series([(t, n_in, n_out)], spec, service_time, i)
        if shapes.has_history(i) and spec.history_periods:
            # The last three days are drawn from `rng` however many are kept, and older ones
            # from a stream of their own, so that the requests simulated do not depend on
            # the number of days of history (from one up) nor on repeat_day
            recent = [requests(base, shapes, i, -p, rate, spec, rng)
                      for p in range(RECENT_DAYS, 0, -1)]
            if spec.repeat_day:  # the history is the simulated day drawn again
                past = [requests(base, shapes, i, 0, rate, spec, history_rng)
                        for _ in range(spec.history_periods)]
            else:
                past = [requests(base, shapes, i, -p, rate, spec, older_rng)
                        for p in range(spec.history_periods, RECENT_DAYS, -1)]
                past += recent[max(0, RECENT_DAYS - spec.history_periods):]
            history[name] = _window_series(past, spec, service_time, i)
    arrival = np.concatenate([p[0] for p in parts])
    order = np.argsort(arrival, kind="stable")
    if spec.arrivals == "clients":
        notes = ["arrivals of the ServeGen-shaped models: ServeGen's per-client processes "
                 "(fitted inter-arrival distribution and rate of each client and 10-minute "
                 "window), one day per model",
                 f"token lengths: Azure LLM inference 2023 ({spec.lengths}), sampled per request"]
        if spec.shape == "mixed":
            notes.append(f"the Functions-shaped models: Azure LLM inference 2023 "
                         f"({spec.lengths}) arrival times thinned to the function's day")
    else:
        notes = [f"arrivals and token lengths: Azure LLM inference 2023 ({spec.lengths}), one "
                 f"hour looped per model from its own offset"]
    if spec.shape in ("servegen", "mixed") and spec.arrivals == "azure":
        notes.append("multi-day rate shape: ServeGen per-model aggregate (14 days), one day per "
                     "model; the Azure LLM trace has no earlier days")
    if spec.shape in ("functions", "mixed"):
        notes.append("Azure Functions 2019 shapes cover one day: those models have no history")
    if spec.repeat_day and history:
        notes.append("history: every earlier day is the simulated day's trace day drawn "
                     "again (--repeat-day: days repeat; only the draw differs)")
    return Workload(
        spec=spec, models=tuple(spec.models), arrival_s=arrival[order],
        model_index=np.concatenate([p[1] for p in parts])[order],
        input_tokens=np.concatenate([p[2] for p in parts])[order].astype(np.int32),
        output_tokens=np.concatenate([p[3] for p in parts])[order].astype(np.int32),
        history=history, actual=actual, notes=tuple(notes),
    )


def _model_requests(base: LLMTrace, shapes: _Shapes, i: int, period: int, rate_rps: float,
                    spec: WorkloadSpec, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One model's arrivals over [0, duration) of a period, with token lengths."""
    duration = spec.duration_s
    grid = np.linspace(0.0, duration, 512)
    trace_start = shapes.day_of(i, period)
    envelope = shapes.multiplier(i, trace_start + grid * spec.time_scale)
    peak = max(float(envelope.max()), 1e-9)
    # The base trace, rescaled to the envelope's peak rate, looped from a random offset.
    base_rate = len(base.arrival_s) / max(base.duration_s, 1.0)
    stretch = base_rate / (rate_rps * peak)  # simulated seconds per trace second
    gaps = np.diff(base.arrival_s, append=base.arrival_s[-1] + 1.0 / base_rate) * stretch
    needed = int(duration / gaps.mean() * 1.2) + 16
    start = int(rng.integers(len(gaps)))
    index = (start + np.arange(needed)) % len(gaps)
    times = np.cumsum(gaps[index]) - gaps[index[0]]
    while times[-1] < duration:  # rare: extend the loop
        more = (index[-1] + 1 + np.arange(needed)) % len(gaps)
        times = np.concatenate([times, times[-1] + np.cumsum(gaps[more])])
        index = np.concatenate([index, more])
    keep = times < duration
    times, index = times[keep], index[keep]
    accept = rng.random(len(times)) < np.interp(times, grid, envelope) / peak
    index = index[accept]
    return (times[accept], np.minimum(base.input_tokens[index], spec.input_cap),
            base.output_tokens[index])


def _client_requests(base: LLMTrace, shapes: _Shapes, i: int, period: int, rate_rps: float,
                     spec: WorkloadSpec, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One model's arrivals over [0, duration) of a period from ServeGen's clients."""
    clients = shapes.clients[SERVEGEN_SERIES[i % len(SERVEGEN_SERIES)]]
    scale = rate_rps / clients.mean_rate  # the model's 14-day mean rate becomes its share
    trace_start = shapes.day_of(i, period)
    window_sim_s = SERVEGEN_WINDOW_S / spec.time_scale
    first = int(trace_start // SERVEGEN_WINDOW_S)
    last = int(np.ceil((trace_start + spec.duration_s * spec.time_scale) / SERVEGEN_WINDOW_S))
    starts, rows = [], []
    for w in range(first, last):  # windows may wrap past the trace's last day
        sel = clients.rows_in(w % SERVEGEN_WINDOWS, w % SERVEGEN_WINDOWS + 1)
        rows.append(np.arange(sel.start, sel.stop))
        starts.append(np.full(sel.stop - sel.start,
                              (w * SERVEGEN_WINDOW_S - trace_start) / spec.time_scale))
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    times = renewal_arrivals(clients.pattern[row], clients.shape[row], clients.rate[row] * scale,
                             np.concatenate(starts) if starts else np.zeros(0),
                             window_sim_s, rng)
    times = np.sort(times[(times >= 0) & (times < spec.duration_s)])
    pick = rng.integers(len(base.arrival_s), size=len(times))
    return (times, np.minimum(base.input_tokens[pick], spec.input_cap),
            base.output_tokens[pick])


def renewal_arrivals(pattern: np.ndarray, shape: np.ndarray, rate: np.ndarray,
                     start: np.ndarray, length_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of independent renewal processes, one per row, each over
    [start, start + length_s): inter-arrival times from the row's family (an index into
    SERVEGEN_PATTERNS: exponential, Gamma or Weibull with the given shape), scaled to mean
    1 / rate. Each process starts in its stationary phase (the first arrival a uniform
    fraction of a gap after the start)."""
    out = []
    weibull = pattern == 2
    unit_mean = np.ones(len(rate))  # a Weibull(k) draw has mean Γ(1 + 1/k)
    unit_mean[weibull] = [math.gamma(1.0 + 1.0 / k) for k in shape[weibull]]
    open_rows = np.flatnonzero(rate > 0)
    elapsed = np.zeros(len(rate))
    first = True
    while len(open_rows):
        expected = rate[open_rows] * (length_s - elapsed[open_rows])
        draws = np.ceil(expected * 1.25 + 4).astype(np.int64)
        owner = np.repeat(open_rows, draws)
        gaps = _gaps(pattern[owner], shape[owner], rng) / (unit_mean[owner] * rate[owner])
        offsets = np.concatenate([[0], np.cumsum(draws)[:-1]])
        if first:
            gaps[offsets] *= rng.random(len(offsets))
            first = False
        total = np.cumsum(gaps)
        base = np.repeat(total[offsets] - gaps[offsets], draws)  # segmented cumulative sum
        at = elapsed[owner] + (total - base)
        inside = at < length_s
        out.append(start[owner[inside]] + at[inside])
        elapsed[open_rows] = at[offsets + draws - 1]
        open_rows = open_rows[elapsed[open_rows] < length_s]
    return np.concatenate(out) if out else np.zeros(0)


def _gaps(pattern: np.ndarray, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inter-arrival draws from each row's family and shape: exponential (mean 1), Gamma(k)
    with scale 1/k (mean 1), Weibull(k) with scale 1 (mean Γ(1 + 1/k))."""
    gaps = rng.exponential(size=len(pattern))
    gamma, weibull = pattern == 1, pattern == 2
    if gamma.any():
        k = shape[gamma]
        gaps[gamma] = rng.gamma(k) / k
    if weibull.any():
        gaps[weibull] = rng.weibull(shape[weibull])
    return gaps


def _window_series(periods: list[tuple[np.ndarray, np.ndarray, np.ndarray]], spec: WorkloadSpec,
                   service_time: ServiceTime, model: int) -> WindowSeries:
    n = max(1, int(np.ceil(spec.duration_s / spec.window_s)))
    avg, peak, rate = (np.zeros((len(periods), n)) for _ in range(3))
    for p, (t, n_in, n_out) in enumerate(periods):
        avg[p], peak[p], rate[p] = concurrency_by_window(
            t, t + service_time(model, n_in, n_out), spec.window_s, n)
    return WindowSeries(avg, peak, rate)


def concurrency_by_window(start: np.ndarray, end: np.ndarray, window_s: float, num_windows: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time-weighted mean and peak number of intervals [start, end) open, and arrival rate,
    per window."""
    horizon = window_s * num_windows
    times = np.concatenate([start, np.arange(num_windows + 1) * window_s, end])
    deltas = np.concatenate([np.ones(len(start)), np.zeros(num_windows + 1), -np.ones(len(end))])
    order = np.argsort(times, kind="stable")  # at equal times, arrivals before departures
    times, level = times[order], np.cumsum(deltas[order])
    keep = times <= horizon
    times, level = times[keep], level[keep]
    widths = np.diff(times, append=horizon)
    window = np.minimum((times // window_s).astype(int), num_windows - 1)
    avg = np.bincount(window, weights=level * widths, minlength=num_windows) / window_s
    peak = np.zeros(num_windows)
    np.maximum.at(peak, window, level)
    arrivals = np.bincount(np.minimum((start // window_s).astype(int), num_windows - 1),
                           minlength=num_windows)[:num_windows]
    return avg, peak, arrivals / window_s
