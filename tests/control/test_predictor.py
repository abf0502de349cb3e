"""The forecaster: seasonal baseline, error correction, fallback, online learning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from warmserve.control.forecast_eval import evaluate_forecasts, evaluate_series
from warmserve.control.predictor import ModelForecaster, SeriesForecaster, mean_relative_error
from warmserve.workload.builder import WorkloadSpec, build_workload

_loads = st.floats(min_value=0, max_value=1e4, allow_nan=False)


def test_same_slot_baseline_averages_earlier_periods():
    f = SeriesForecaster(windows_per_period=3, ensemble=False)
    for value in [1, 2, 3, 3, 4, 5]:  # two periods
        f.observe(value)
    f.errors.clear()
    assert f.baseline(6) == pytest.approx(2.0)  # slot 0: (1 + 3) / 2
    assert f.forecast(7) == pytest.approx(3.0)


def test_error_correction_weights_newest_first():
    f = SeriesForecaster(windows_per_period=2, ensemble=False)
    for value in [10, 10]:
        f.observe(value)
    f.errors.clear()
    f.observe(14)  # error +4
    f.observe(12)  # error +2
    # baseline at slot 0: mean(10, 14) = 12; correction: weights 1 (newest, +2) and 1/2 (+4)
    assert f.forecast(4) == pytest.approx(12 + (2 + 2) / 1.5)


def test_robust_correction_ignores_a_single_burst():
    """The peak's correction is the median of the recent errors: one window's burst does not
    move it, where the published weighted mean moves by a third of the burst."""
    robust, published = (SeriesForecaster(windows_per_period=2, ensemble=False, robust=r)
                         for r in (True, False))
    for f in (robust, published):
        for value in [20, 20]:
            f.observe(value)
        f.errors.clear()
        for value in [20, 20, 20, 20, 200]:  # the burst: error +180, newest
            f.observe(value)
    assert robust.forecast(7) == pytest.approx(20.0)
    assert published.forecast(7) > 20 + 180 / 3


def test_a_window_whose_load_stops_early_does_not_inflate_the_peak():
    """A window where the load stops at its start has a tiny average and a peak like any
    other: its peak/average ratio (here 180) must not set the next windows' peak."""
    n, days = 24, 3
    f = ModelForecaster(n)
    f.seed({"avg_concurrency": np.full((days, n), 10.0),
            "peak_concurrency": np.full((days, n), 20.0), "rate_rps": np.full((days, n), 5.0)})
    for avg, peak in [(10, 20)] * 6 + [(0.1, 18), (10, 20)]:
        f.observe(avg, peak, 5.0)
    assert 15 < f.forecast().peak_concurrency < 25  # the mean of the ratios gave 34


def test_without_extensions_every_metric_is_the_published_forecast():
    """`extensions=False` (the `warmserve-published` system): baseline plus the weighted
    error correction, no blend with the last window, no peak ratio, no medians."""
    n, days = 4, 2
    f = ModelForecaster(n, extensions=False)
    f.seed({m: np.full((days, n), 10.0) for m in ("avg_concurrency", "peak_concurrency",
                                                 "rate_rps")})
    f.observe(10, 10, 10)  # error 0
    f.observe(16, 40, 13)  # errors +6, +30, +3 (newest, weight 1 of 1.5)
    forecast = f.forecast()
    assert forecast.avg_concurrency == pytest.approx(10 + 6 / 1.5)
    assert forecast.peak_concurrency == pytest.approx(10 + 30 / 1.5)
    assert forecast.rate_rps == pytest.approx(10 + 3 / 1.5)


def test_fallback_without_history_is_last_value():
    f = SeriesForecaster(windows_per_period=100)
    assert f.forecast(0) == 0.0
    f.observe(7.0)
    assert f.forecast(1) == pytest.approx(7.0)


def test_periodic_series_is_predicted_exactly():
    period = np.array([5.0, 20.0, 50.0, 20.0])
    f = ModelForecaster(windows_per_period=4)
    f.seed({m: np.tile(period, (3, 1)) for m in ("avg_concurrency", "peak_concurrency",
                                                   "rate_rps")})
    for value in period:
        assert f.forecast().peak_concurrency == pytest.approx(value)
        f.observe(value, value, value)


def _noisy_days(levels, n=48, seed=0):
    """Days of one shape, each scaled by its level and drawn with Poisson noise."""
    rng = np.random.default_rng(seed)
    shape = 30 + 20 * np.sin(np.arange(n) / n * 2 * np.pi)
    avg = rng.poisson(np.outer(levels, shape)).astype(float)
    peak = avg + rng.poisson(np.outer(levels, shape) * 0.5)
    return {"avg_concurrency": avg, "peak_concurrency": peak, "rate_rps": avg}


def test_where_days_repeat_the_backtest_keeps_the_same_slot_mean_alone():
    """Days that differ only in their draw: on the earlier days the corrections and the
    blend with the last window lose to the same slot's mean, clearly, so seed() keeps the
    mean alone and today is forecast with it. Where days differ in level the corrections
    win and stay on; with one earlier day there is nothing to backtest."""
    repeating = ModelForecaster(48)
    repeating.seed({m: v[:6] for m, v in _noisy_days([1.0] * 7).items()})
    assert repeating.seasonal_only
    days = _noisy_days([1.0] * 7)
    slot_mean = days["peak_concurrency"][:6, 0].mean()
    assert repeating.forecast().peak_concurrency == pytest.approx(slot_mean)

    levelled = ModelForecaster(48)
    levelled.seed({m: v[:6] for m, v in _noisy_days([0.6, 1.4, 0.8, 1.3, 0.7, 1.2, 1]).items()})
    assert not levelled.seasonal_only

    for short in (ModelForecaster(48), ModelForecaster(48, extensions=False)):
        short.seed({m: v[:1] for m, v in _noisy_days([1.0] * 7).items()})
        assert not short.seasonal_only
    published = ModelForecaster(48, extensions=False)
    published.seed({m: v[:6] for m, v in _noisy_days([1.0] * 7).items()})
    assert not published.seasonal_only


def test_the_backtest_beats_the_extended_forecaster_where_days_repeat():
    """Scored on a seventh day like the six before it, the mean alone that the backtest chose
    errs less than the extended forecaster would have."""
    days = _noisy_days([1.0] * 7, seed=1)
    chosen, extended = ModelForecaster(48), ModelForecaster(48)
    chosen.seed({m: v[:6] for m, v in days.items()})
    extended._feed({m: v[:6] for m, v in days.items()})  # seeded without the backtest
    assert chosen.seasonal_only and not extended.seasonal_only
    errors = {"chosen": [], "extended": []}
    for w in range(48):
        actual = days["peak_concurrency"][6, w]
        for name, f in (("chosen", chosen), ("extended", extended)):
            errors[name].append(abs(f.forecast().peak_concurrency - actual) / actual)
            f.observe(*(days[m][6, w] for m in ("avg_concurrency", "peak_concurrency",
                                                 "rate_rps")))
    assert np.mean(errors["chosen"]) < np.mean(errors["extended"])


def test_ensemble_leans_on_the_better_predictor():
    f = SeriesForecaster(windows_per_period=4)
    for value in [1, 1, 1, 1]:  # a useless history ...
        f.observe(value)
    for s in (f.errors, f.seasonal_abs_errors, f.last_abs_errors):
        s.clear()
    for value in [50, 52, 54, 56]:  # ... and a slowly drifting present
        f.observe(value)
    assert abs(f.forecast(8) - 56) < abs(f.seasonal(8) - 56)


def test_ensemble_weights_are_inverse_mean_squared_errors():
    """Inverse-variance weights, the best linear blend of independent unbiased estimates: a
    member steady within 2 counts beats one exact thrice and 8 off once, though both err by 2
    on average (with inverse mean absolute errors they would weigh the same). Where days
    repeat, the last window errs like the second and the seasonal forecast like the first."""
    f = SeriesForecaster(windows_per_period=2)
    f.values = [10.0, 20.0]  # window 2's same slot is 10 (no errors yet: no correction)
    f.seasonal_abs_errors = [2.0, 2.0, 2.0, 2.0]
    f.last_abs_errors = [0.0, 0.0, 0.0, 8.0]
    assert f.seasonal(2) == 10.0
    assert f.forecast(2) == pytest.approx((10 / 4 + 20 / 16) / (1 / 4 + 1 / 16))  # 12


def test_noisy_peaks_follow_the_average_times_the_peak_ratio():
    """Average concurrency repeats day to day, the window peak is the average times ~2 plus
    noise: the peak/avg member beats the peak's own seasonal forecast, and the blend leans
    on it."""
    rng = np.random.default_rng(0)
    n, days = 24, 4
    avg = np.tile(10 + 5 * np.sin(np.arange(n) / 4), (days + 1, 1))
    peak = avg * (2 + rng.uniform(-0.6, 0.6, avg.shape))
    own, blended = ModelForecaster(n), ModelForecaster(n)
    own_errors, blend_errors = [], []
    for f in (own, blended):
        f.seed({"avg_concurrency": avg[:days], "peak_concurrency": peak[:days],
                "rate_rps": avg[:days]})
    for w in range(n):
        own_errors.append(abs(own.series["peak_concurrency"].forecast(own.num_windows)
                              - peak[days, w]))
        blend_errors.append(abs(blended.forecast().peak_concurrency - peak[days, w]))
        own.observe(avg[days, w], peak[days, w], avg[days, w])
        blended.observe(avg[days, w], peak[days, w], avg[days, w])
    assert np.mean(blend_errors[4:]) < np.mean(own_errors[4:])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_loads, _loads), min_size=1, max_size=12))
def test_without_history_every_forecast_is_the_last_window_exactly(windows):
    """Exactly, not approximately: `predict` flags a model whose forecast loses to the last
    window, and a blend of two equal values that rounds one ulp up would be flagged."""
    f = ModelForecaster(windows_per_period=100)
    for avg, peak in windows:
        f.observe(avg, max(avg, peak), avg)
        forecast = f.forecast()
        assert forecast.avg_concurrency == avg
        assert forecast.peak_concurrency == max(avg, peak)


def test_mre_ignores_tiny_actuals():
    assert mean_relative_error(np.array([2.0, 5.0]), np.array([1.0, 0.1])) == 1.0


def test_worse_than_both_naive_is_flagged_only_when_every_naive_predictor_wins():
    from warmserve.control.forecast_eval import _worse_than_both_naive

    def row(peak, last, yesterday):
        return {"peak_mre": peak, "naive_last_window_peak_mre": last,
                "naive_same_slot_yesterday_peak_mre": yesterday}

    assert _worse_than_both_naive(row(0.3, 0.2, 0.25))
    assert not _worse_than_both_naive(row(0.3, 0.2, 0.35))  # beats yesterday
    assert not _worse_than_both_naive(row(0.2, 0.2, None))  # equals the last window
    assert _worse_than_both_naive(row(0.3, 0.2, None))  # no yesterday: the last window alone
    assert not _worse_than_both_naive(row(float("nan"), 0.2, None))


def test_evaluate_reports_all_keys():
    w = build_workload(WorkloadSpec(("a", "b"), 20.0, 600.0, window_s=60.0))
    report = evaluate_forecasts(w)
    assert set(report["overall"]) >= {"peak_mre", "avg_mre", "naive_last_window_peak_mre",
                                      "naive_same_slot_yesterday_peak_mre",
                                      "worse_than_both_naive"}
    assert set(report["models"]["a"]) >= {"worse_than_both_naive"}
    assert report["models"]["a"]["windows"] == 10
    assert 0 <= report["overall"]["peak_mre"] < 1


def test_a_window_the_span_cuts_short_is_not_scored():
    """630 s of 60-s windows: the eleventh window holds 30 s, and its peak and average are
    not comparable with a whole window's forecast."""
    whole = evaluate_forecasts(build_workload(WorkloadSpec(("a",), 20.0, 600.0, window_s=60.0)))
    cut = evaluate_forecasts(build_workload(WorkloadSpec(("a",), 20.0, 630.0, window_s=60.0)))
    assert (whole["models"]["a"]["windows"], cut["models"]["a"]["windows"]) == (10, 11)
    assert whole["models"]["a"]["windows_scored"] == cut["models"]["a"]["windows_scored"] == 9
    short = evaluate_forecasts(build_workload(WorkloadSpec(("a",), 20.0, 90.0, window_s=60.0)))
    assert short["models"]["a"]["windows_scored"] == 0
    assert short["models"]["a"]["peak_mre"] is None and short["overall"]["peak_mre"] is None


def test_without_history_the_forecast_is_never_flagged():
    """The forecast is then the last window's value, so `predict` must score it exactly as
    that naive predictor and never mark it worse."""
    w = build_workload(WorkloadSpec(("a", "b", "c"), 20.0, 600.0, window_s=60.0,
                                    shape="functions"))
    report = evaluate_forecasts(w)
    for row in report["models"].values():
        assert not row["has_history"]
        assert row["peak_mre"] == row["naive_last_window_peak_mre"]
        assert not row["worse_than_both_naive"]


def test_a_series_whose_days_repeat_is_forecast_exactly_and_the_naive_ones_are_not():
    day = np.array([5.0, 20.0, 50.0, 20.0])
    report = evaluate_series(np.tile(day, 6), windows_per_period=4, skip_periods=3)
    assert report["mre"] == pytest.approx(0.0, abs=1e-6)  # the blend weights' epsilon
    assert report["published_mre"] == 0.0
    assert report["naive_same_slot_yesterday_mre"] == 0.0
    assert report["naive_last_window_mre"] > 0.5
    assert report["windows"] == 12  # days 4-6


def test_series_scoring_uses_the_floor_and_scores_the_naive_predictors_by_hand():
    values = np.array([10.0, 20.0, 10.0, 20.0, 10.0, 40.0, 0.5, 20.0])
    report = evaluate_series(values, windows_per_period=2, skip_periods=2, floor=1.0)
    assert report["windows"] == 3  # 10, 40, 20 (0.5 is under the floor)
    # last window: 20 for 10, 10 for 40, 0.5 for 20; same slot yesterday: 10, 20, 40
    assert report["naive_last_window_mre"] == pytest.approx((1.0 + 0.75 + 0.975) / 3)
    assert report["naive_same_slot_yesterday_mre"] == pytest.approx((0.0 + 0.5 + 1.0) / 3)


def test_series_scoring_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="needs more than 12"):
        evaluate_series(np.ones(12), windows_per_period=4, skip_periods=3)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_series(np.array([1.0, np.nan] * 10), windows_per_period=4)
    with pytest.raises(ValueError, match="skip_periods=0"):
        evaluate_series(np.ones(20), windows_per_period=4, skip_periods=0)


@settings(max_examples=200, deadline=None)
@example(history=[(1.0, 0.0, 0.0)] * 4, today=[(1.1e-308, 2.0, 0.0)] * 4,
         extensions=True)  # denormal averages: their peak/avg ratios overflowed to inf
@given(history=st.lists(st.tuples(_loads, _loads, _loads), max_size=12),
       today=st.lists(st.tuples(_loads, _loads, _loads), min_size=1, max_size=12),
       extensions=st.booleans())
def test_forecasts_stay_finite_non_negative_and_the_peak_covers_the_average(history, today,
                                                                             extensions):
    """Whatever non-negative windows it sees (zeros, bursts, no history), every forecast is a
    finite number >= 0, and the peak forecast is never below the average one."""
    f = ModelForecaster(windows_per_period=4, extensions=extensions)
    days = len(history) // 4
    if days:
        rows = np.array(history[: days * 4], dtype=float).reshape(days, 4, 3)
        f.seed({"avg_concurrency": rows[:, :, 0], "peak_concurrency": rows[:, :, 1],
                "rate_rps": rows[:, :, 2]})
    for avg, peak, rate in today:
        f.observe(avg, max(avg, peak), rate)
        forecast = f.forecast()
        values = (forecast.avg_concurrency, forecast.peak_concurrency, forecast.rate_rps)
        assert all(np.isfinite(v) and v >= 0 for v in values), values
        assert forecast.peak_concurrency >= forecast.avg_concurrency
