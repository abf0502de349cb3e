"""How well the forecaster predicts a workload's windows, against two naive predictors."""

from __future__ import annotations

import numpy as np

from warmserve.control.predictor import ModelForecaster, mean_relative_error
from warmserve.workload.builder import Workload


def evaluate_forecasts(workload: Workload, error_windows: int = 10,
                       replays: list[Workload] | None = None) -> dict:
    """Replay each model's simulated span window by window: forecast, then observe.

    Returns {"overall": {...}, "with_history": {...}, "models": {name: {...}}} with mean
    relative errors of the peak and average concurrency forecasts, and of two naive peak
    predictors (last window; same slot of the previous day, where there is one), and
    `worse_than_both_naive` where the peak forecast loses to every naive one. Every
    predictor is scored on the same windows: the whole ones (a last window that the span
    cuts short is not comparable with a forecast for a whole one) but the first, which has
    no last window. An error is None where no scored window carries load.
    `with_history` averages over the models that have earlier days only, so that all four
    errors there cover the same models.

    `replays`: the same workload drawn with other seeds (same load shape, fresh randomness).
    Their mean per window is what an oracle knowing the shape would predict; its errors
    (`oracle_peak_mre`, `oracle_avg_mre`) are the floor no forecaster gets below.
    """
    models = {}
    scored = slice(1, max(1, _whole_windows(workload)))  # empty where there is no second
    for name in workload.models:
        actual = workload.actual[name]
        n = workload.num_windows
        forecaster = ModelForecaster(n, error_windows)
        history = workload.history.get(name)
        if history is not None:
            forecaster.seed({"avg_concurrency": history.avg_concurrency,
                             "peak_concurrency": history.peak_concurrency,
                             "rate_rps": history.rate_rps})
        peak_pred, avg_pred = np.zeros(n), np.zeros(n)
        for w in range(n):
            forecast = forecaster.forecast()
            peak_pred[w], avg_pred[w] = forecast.peak_concurrency, forecast.avg_concurrency
            forecaster.observe(actual.avg_concurrency[0, w], actual.peak_concurrency[0, w],
                               actual.rate_rps[0, w])
        peak, avg = actual.peak_concurrency[0], actual.avg_concurrency[0]
        previous = slice(scored.start - 1, scored.stop - 1)
        entry = {
            "peak_mre": _mre(peak_pred[scored], peak[scored]),
            "avg_mre": _mre(avg_pred[scored], avg[scored]),
            "naive_last_window_peak_mre": _mre(peak[previous], peak[scored]),
            "naive_same_slot_yesterday_peak_mre": (
                _mre(history.peak_concurrency[-1, scored], peak[scored])
                if history is not None else None),
            **(_oracle(workload, replays, name, scored) if replays else {}),
            "has_history": history is not None,
            # the backtest on the earlier days found them repeating (ModelForecaster.seed)
            "same_slot_mean_alone": forecaster.seasonal_only,
            "windows": n,
            "windows_scored": scored.stop - scored.start,
            "mean_peak_concurrency": float(actual.peak_concurrency[0].mean()),
        }
        entry["worse_than_both_naive"] = _worse_than_both_naive(entry)
        models[name] = entry
    with_history = {k: v for k, v in models.items() if v["has_history"]}
    return {"overall": _overall(models),
            "with_history": _overall(with_history) if with_history else None,
            "models": models}


def evaluate_series(values: np.ndarray, windows_per_period: int, skip_periods: int = 3,
                    floor: float = 1.0, error_windows: int = 10) -> dict:
    """The forecaster on one series of a trace's own numbers, with no replay in between.

    As `predict` and the live controller do: the first `skip_periods` periods seed the
    forecaster as history, its corrections and blend weights then learn online from the
    windows after them, and each of those is forecast from every window before it. Returns
    the mean relative errors, over windows whose actual value is at least `floor`, of our
    forecast (`mre`), the published one (`published_mre`) and the two naive predictors,
    and how many windows were scored.
    """
    values = np.asarray(values, dtype=float)
    if windows_per_period < 1 or skip_periods < 1:
        raise ValueError(f"windows_per_period={windows_per_period} and "
                         f"skip_periods={skip_periods} must be >= 1")
    start = skip_periods * windows_per_period
    if len(values) <= start:
        raise ValueError(f"{len(values)} windows: scoring from period {skip_periods} needs more "
                         f"than {start}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("the series holds a negative or non-finite value")
    actual = values[start:]
    out = {}
    for key, extensions in (("mre", True), ("published_mre", False)):
        forecaster = ModelForecaster(windows_per_period, error_windows, extensions)
        series = forecaster.series["rate_rps"]
        for value in values[:start]:
            series.observe(value)
        forecaster.forget_errors()
        predicted = np.empty(len(actual))
        for w, value in enumerate(actual):
            predicted[w] = series.forecast(start + w)
            series.observe(value)
        out[key] = mean_relative_error(predicted, actual, floor)
    out["naive_last_window_mre"] = mean_relative_error(values[start - 1:-1], actual, floor)
    out["naive_same_slot_yesterday_mre"] = mean_relative_error(
        values[start - windows_per_period:-windows_per_period], actual, floor)
    out["windows"] = int(np.sum(actual >= floor))
    return out


def _whole_windows(workload: Workload) -> int:
    """Windows that the simulated span holds whole."""
    whole = int(np.floor(workload.spec.duration_s / workload.window_s + 1e-9))
    return min(workload.num_windows, whole)


def _mre(predicted: np.ndarray, actual: np.ndarray) -> float | None:
    """The mean relative error, or None where no window carries load (JSON has no NaN)."""
    value = mean_relative_error(predicted, actual)
    return None if np.isnan(value) else value


def _worse_than_both_naive(row: dict) -> bool:
    """Is the peak forecast worse than every naive predictor that applies (the same slot
    yesterday needs a yesterday)? The goal is never to be."""
    naive = [row[k] for k in ("naive_last_window_peak_mre", "naive_same_slot_yesterday_peak_mre")
             if row[k] is not None]
    peak = row["peak_mre"]
    return bool(naive) and peak is not None and peak > max(naive)


def _oracle(workload: Workload, replays: list[Workload], name: str, scored: slice) -> dict:
    out = {}
    for metric, key in (("peak_concurrency", "oracle_peak_mre"),
                        ("avg_concurrency", "oracle_avg_mre")):
        actual = getattr(workload.actual[name], metric)[0]
        expected = np.mean([getattr(w.actual[name], metric)[0] for w in replays], axis=0)
        out[key] = _mre(expected[scored], actual[scored])
    return out


def _overall(models: dict) -> dict:
    keys = ("peak_mre", "avg_mre", "naive_last_window_peak_mre",
            "naive_same_slot_yesterday_peak_mre")
    if any("oracle_peak_mre" in m for m in models.values()):
        keys += ("oracle_peak_mre", "oracle_avg_mre")
    overall = {}
    for key in keys:
        values = [m[key] for m in models.values() if m[key] is not None]
        overall[key] = float(np.mean(values)) if values else None
    overall["worse_than_both_naive"] = _worse_than_both_naive(overall)
    with_history = [m for m in models.values() if m["has_history"]]
    overall["models_with_history"] = len(with_history)
    overall["models"] = len(models)
    return overall
