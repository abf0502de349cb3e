"""Load forecasting: a seasonal same-slot baseline plus exponentially weighted error correction.

For window w, the baseline is the mean of the values observed at the same slot of earlier
periods (days); the correction adds the weighted mean of the last ≤ K windows' baseline errors
(weights 1, 1/2, 1/4, … newest first) — the published predictor. With no same-slot history it
falls back to the last observed window.

Beyond the paper (`ensemble=True`, the default): the seasonal forecast is blended with the
last window's value, each weighted by the inverse of its own recent mean squared error (the
inverse-variance weights, the best linear blend of two independent unbiased estimates), so a
trace whose days repeat leans on the seasonal term and one whose windows drift leans on the
last window, without a knob per trace. Where there is same-slot history, the peak is
blended the same way with a third estimate: the average-concurrency forecast times the recent
peak-to-average ratio — a window's peak under bursty clients is noisy, its average much less
so. Both peak terms are robust to single bursts: the ratio is the median of the last
`RATIO_WINDOWS` windows' ratios, and the peak's own correction is the median of its recent
errors rather than their weighted mean (one client's burst in one window would otherwise
pull the next forecasts up by half its size). Without history every forecast stays the last
window's value.

Where days repeat, though, the corrections and the blend only add the noise of the windows
they learn from, and the same slot's mean alone is the better forecast. `seed` tells the two
kinds of load apart on the history itself: it forecasts each of the last earlier days from
the ones before it both ways, and keeps the mean alone for the day only where it wins by
more than twice the standard error of the difference (on ServeGen's own days, which differ
in level, that never happens).

The forecaster learns online: `observe` appends each closed window. No clock, no I/O: windows
are integers handed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("avg_concurrency", "peak_concurrency", "rate_rps")
RATIO_WINDOWS = 30  # windows whose peak/average ratios set the ratio member's median
BACKTEST_PERIODS = 3  # earlier periods on which seed() scores the forecaster against the mean
BACKTEST_MAX_WINDOWS = 2_000  # and at most this many windows of them (the last ones)


@dataclass
class SeriesForecaster:
    """One metric of one model. Window index 0 is the first window of the oldest period."""

    windows_per_period: int
    error_windows: int = 10
    max_periods: int = 7
    ensemble: bool = True
    robust: bool = False  # correct by the median of recent errors, not their weighted mean
    values: list[float] = field(default_factory=list)  # observed, by absolute window index
    errors: list[float] = field(default_factory=list)  # actual - baseline, by window
    seasonal_abs_errors: list[float] = field(default_factory=list)
    last_abs_errors: list[float] = field(default_factory=list)

    def same_slot(self, window: int) -> list[float]:
        return [self.values[w] for w in range(window - self.windows_per_period, -1,
                                              -self.windows_per_period)
                if w < len(self.values)][: self.max_periods]

    def baseline(self, window: int) -> float:
        same_slot = self.same_slot(window)
        if same_slot:
            return float(np.mean(same_slot))
        if self.values:
            return self.values[min(window, len(self.values)) - 1]
        return 0.0

    def seasonal(self, window: int) -> float:
        """The published forecast: baseline plus weighted mean of recent baseline errors
        (without same-slot history: the last value, uncorrected). A `robust` series takes
        the median of the recent errors instead."""
        if not self.same_slot(window):
            return self.baseline(window)
        recent = self.errors[-self.error_windows:][::-1] if self.error_windows else []
        correction = 0.0
        if recent and self.robust:
            correction = float(np.median(recent))
        elif recent:
            weights = 0.5 ** np.arange(len(recent))
            correction = float(np.dot(weights, recent) / weights.sum())
        return max(0.0, self.baseline(window) + correction)

    def forecast(self, window: int) -> float:
        seasonal = self.seasonal(window)
        if (not self.ensemble or not self.values or not self.last_abs_errors
                or not self.same_slot(window)):  # without history, seasonal is the last value
            return seasonal
        return _blend(seasonal, self.seasonal_abs_errors, self.values[-1],
                      self.last_abs_errors, self.error_windows or 1)

    def observe(self, value: float) -> None:
        """Record the next window's actual value (windows arrive in order)."""
        window = len(self.values)
        if self.values:
            self.seasonal_abs_errors.append(abs(value - self.seasonal(window)))
            self.last_abs_errors.append(abs(value - self.values[-1]))
        if self.same_slot(window):  # errors of the seasonal baseline only
            self.errors.append(value - self.baseline(window))
        self.values.append(float(value))


@dataclass(frozen=True)
class Forecast:
    avg_concurrency: float
    peak_concurrency: float
    rate_rps: float


class ModelForecaster:
    """Forecasts of average and peak concurrency and request rate for one model."""

    def __init__(self, windows_per_period: int, error_windows: int = 10,
                 extensions: bool = True) -> None:
        """`extensions=False`: the published forecaster alone (seasonal baseline plus the
        weighted error correction, for every metric; no blends, no medians)."""
        self.windows_per_period = windows_per_period
        self.series = {m: SeriesForecaster(windows_per_period, error_windows,
                                           ensemble=extensions,
                                           robust=extensions and m == "peak_concurrency")
                       for m in METRICS}
        self.extensions = extensions
        self.error_windows = error_windows or 1
        self._peak_abs_errors: list[float] = []  # of the peak series' own forecast
        self._ratio_abs_errors: list[float] = []  # of avg forecast x peak/avg ratio
        self.seasonal_only = False  # set by seed() where the days' backtest says so

    @property
    def num_windows(self) -> int:
        return len(self.series["rate_rps"].values)

    def seed(self, history: dict[str, np.ndarray]) -> None:
        """Feed earlier periods: each metric a [periods, windows_per_period] array (or the
        same values flat, oldest first). With two or more whole periods, the extended
        forecaster backtests itself on the last of them against the same slot's mean
        alone, and forecasts by that mean alone where it clearly wins (`seasonal_only`)."""
        self._feed(history)
        if self.extensions:
            self.seasonal_only = _clearly_better(_backtest(
                history, self.windows_per_period, self.series["peak_concurrency"].error_windows))

    def _feed(self, history: dict[str, np.ndarray]) -> None:
        for metric, rows in history.items():
            for value in np.asarray(rows).ravel():
                self.series[metric].observe(float(value))
        self.forget_errors()

    def forget_errors(self) -> None:
        """Drop the errors learned so far (after seeding history: corrections and ensemble
        weights learn from the current period only)."""
        for s in self.series.values():
            s.errors.clear()
            s.seasonal_abs_errors.clear()
            s.last_abs_errors.clear()
        self._peak_abs_errors.clear()
        self._ratio_abs_errors.clear()

    def observe(self, avg_concurrency: float, peak_concurrency: float, rate_rps: float) -> None:
        window = self.num_windows
        if self.series["peak_concurrency"].values:
            own = self.series["peak_concurrency"].forecast(window)
            self._peak_abs_errors.append(abs(peak_concurrency - own))
            ratio = self._ratio_peak(window)
            if ratio is not None:
                self._ratio_abs_errors.append(abs(peak_concurrency - ratio))
        for metric, value in zip(METRICS, (avg_concurrency, peak_concurrency, rate_rps),
                                 strict=True):
            self.series[metric].observe(value)

    def forecast(self, window: int | None = None) -> Forecast:
        window = self.num_windows if window is None else window
        if self.seasonal_only:
            avg, peak, rate = (self.series[m].baseline(window) for m in METRICS)
            return Forecast(avg, max(peak, avg), rate)
        avg, peak, rate = (self.series[m].forecast(window) for m in METRICS)
        ratio = self._ratio_peak(window)
        periodic = bool(self.series["peak_concurrency"].same_slot(window))
        if (self.extensions and periodic and ratio is not None and self._peak_abs_errors
                and self._ratio_abs_errors):
            peak = _blend(peak, self._peak_abs_errors, ratio, self._ratio_abs_errors,
                          self.error_windows)
        return Forecast(avg, max(peak, avg), rate)

    def _ratio_peak(self, window: int) -> float | None:
        """The average forecast times the median peak/average ratio of the last windows (the
        median: a window whose load stops early has a tiny average and a huge ratio)."""
        avg = self.series["avg_concurrency"].values[-RATIO_WINDOWS:]
        peak = self.series["peak_concurrency"].values[-RATIO_WINDOWS:]
        ratios = [p / a for p, a in zip(peak, avg, strict=True) if a >= 1e-6]  # below: no load
        if not ratios:
            return None
        return self.series["avg_concurrency"].forecast(window) * float(np.median(ratios))


def _window_errors(forecaster: ModelForecaster, window: int, forecast: Forecast,
                   avg_actual: float, peak_actual: float) -> np.ndarray:
    """[extended, seasonal mean alone]: the relative errors of one window's average and
    peak concurrency forecasts, summed over those that are at least 1 (as `predict`
    scores)."""
    avg = forecaster.series["avg_concurrency"].baseline(window)
    peak = max(forecaster.series["peak_concurrency"].baseline(window), avg)
    errors = np.zeros(2)
    for actual, ours, alone in ((avg_actual, forecast.avg_concurrency, avg),
                                (peak_actual, forecast.peak_concurrency, peak)):
        if actual >= 1.0:
            errors += (abs(ours - actual) / actual, abs(alone - actual) / actual)
    return errors


def _backtest(history: dict[str, np.ndarray], windows_per_period: int,
              error_windows: int) -> list[float]:
    """How the extended forecaster and the same slot's mean alone forecast the last
    `BACKTEST_PERIODS` periods of `history`, each period from the ones before it: per
    window with load, the mean alone's error less the extended one's (`_window_errors`).

    Where days repeat, the extended forecaster's corrections and its blend with the last
    window only add the noise of the windows they learn from; where days differ in level
    they are what follows today. The earlier days tell which kind of load this is."""
    columns = {m: np.asarray(history[m], dtype=float).ravel() for m in METRICS}
    end = len(columns["peak_concurrency"]) // windows_per_period * windows_per_period
    first = max(end - BACKTEST_MAX_WINDOWS, windows_per_period)  # the first window scored
    start = max(first // windows_per_period, end // windows_per_period - BACKTEST_PERIODS
                ) * windows_per_period  # the start of its period: history before it
    first = max(first, start)
    forecaster = ModelForecaster(windows_per_period, error_windows)
    forecaster._feed({m: v[:start] for m, v in columns.items()})
    diffs = []
    for w in range(start, end):
        if w % windows_per_period == 0:
            forecaster.forget_errors()  # each day learns anew, as after seed()
        if w >= first:
            e = _window_errors(forecaster, w, forecaster.forecast(),
                               columns["avg_concurrency"][w], columns["peak_concurrency"][w])
            if e.any():
                diffs.append(float(e[1] - e[0]))
        forecaster.observe(*(columns[m][w] for m in METRICS))
    return diffs


def _clearly_better(diffs: list[float]) -> bool:
    """Whether the mean of the differences lies below 0 by more than 2 standard errors:
    a win of the seasonal mean that the backtest's noise does not explain."""
    if len(diffs) < 3:
        return False
    spread = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
    return float(np.mean(diffs)) + 2.0 * spread < 0.0


def _blend(a: float, a_errors: list[float], b: float, b_errors: list[float], k: int) -> float:
    """a and b weighted by the inverse of their mean squared errors over the last k windows
    (inverse-variance weights: the best linear blend of independent unbiased estimates)."""
    w_a = 1.0 / (np.mean(np.square(a_errors[-k:])) + 1e-6)
    w_b = 1.0 / (np.mean(np.square(b_errors[-k:])) + 1e-6)
    return float((w_a * a + w_b * b) / (w_a + w_b))


def mean_relative_error(predicted: np.ndarray, actual: np.ndarray, floor: float = 1.0) -> float:
    """Mean of |p - a| / a over windows whose actual value is at least `floor`."""
    mask = actual >= floor
    if not mask.any():
        return float("nan")
    return float(np.mean(np.abs(predicted[mask] - actual[mask]) / actual[mask]))
