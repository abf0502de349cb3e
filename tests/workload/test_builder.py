"""The multi-model workload builder: power-law shares, envelopes, history, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.workload.builder import (
    WorkloadSpec,
    build_workload,
    concurrency_by_window,
    renewal_arrivals,
)
from warmserve.workload.presets import PRESETS, get_preset

SPEC = WorkloadSpec(("a", "b", "c", "d"), total_rate_rps=20.0, duration_s=600.0, window_s=60.0)


def test_shares_follow_power_law_and_total_rate():
    w = build_workload(SPEC)
    counts = np.bincount(w.model_index, minlength=4)
    assert counts.sum() / SPEC.duration_s == pytest.approx(20.0, rel=0.25)
    assert counts[0] > counts[1] > counts[3]
    shares = SPEC.shares()
    assert shares[0] / shares[1] == pytest.approx(2.0)


def test_seeded_and_reproducible():
    a, b = build_workload(SPEC), build_workload(SPEC)
    assert np.array_equal(a.arrival_s, b.arrival_s)
    assert np.array_equal(a.input_tokens, b.input_tokens)
    c = build_workload(WorkloadSpec(SPEC.models, 20.0, 600.0, window_s=60.0, seed=1))
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_tokens_capped_sorted_and_history_shaped():
    w = build_workload(SPEC)
    assert (np.diff(w.arrival_s) >= 0).all() and w.arrival_s.max() < SPEC.duration_s
    assert w.input_tokens.max() <= 1024 and w.output_tokens.min() >= 1
    for name in SPEC.models:
        assert w.history[name].peak_concurrency.shape == (3, 10)
        assert w.actual[name].peak_concurrency.shape == (1, 10)
        assert (w.actual[name].peak_concurrency >= w.actual[name].avg_concurrency).all()


def test_functions_shape_has_no_history_and_is_noted():
    w = build_workload(WorkloadSpec(("a", "b"), 10.0, 300.0, shape="functions", window_s=30.0))
    assert w.history == {}
    assert any("one day" in note for note in w.notes)


def test_concurrency_by_window_exact():
    start = np.array([0.0, 5.0, 12.0])
    end = np.array([10.0, 15.0, 13.0])
    avg, peak, rate = concurrency_by_window(start, end, 10.0, 2)
    assert avg.tolist() == pytest.approx([1.5, 0.6])  # (10 + 5) / 10; (5 + 1) / 10
    assert peak.tolist() == [2, 2]
    assert rate.tolist() == [0.2, 0.1]


@pytest.mark.parametrize(("pattern", "shape", "cv"),
                         [(0, 1.0, 1.0), (1, 0.25, 2.0), (1, 4.0, 0.5), (2, 0.5, 2.236),
                          (2, 2.0, 0.523)])
def test_renewal_arrivals_keep_rate_and_burstiness(pattern, shape, cv):
    rng = np.random.default_rng(3)
    n, length = 400, 500.0
    t = renewal_arrivals(np.full(n, pattern, np.int8), np.full(n, shape), np.full(n, 2.0),
                         np.arange(n) * 1e4, length, rng)
    row = (t // 1e4).astype(int)
    offset = t - row * 1e4
    assert (offset >= 0).all() and (offset < length).all()  # inside each row's span
    assert len(t) / n == pytest.approx(2.0 * length, rel=0.05)  # mean 1 / rate
    gaps = np.concatenate([np.diff(np.sort(offset[row == r])) for r in range(n)])
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)  # the family's CV


def test_renewal_arrivals_idle_rows_and_nothing():
    rng = np.random.default_rng(0)
    t = renewal_arrivals(np.zeros(2, np.int8), np.ones(2), np.array([0.0, 1.0]),
                         np.array([0.0, 100.0]), 50.0, rng)
    assert len(t) and (t >= 100).all()
    assert len(renewal_arrivals(np.zeros(0, np.int8), np.zeros(0), np.zeros(0), np.zeros(0),
                                10.0, rng)) == 0


CLIENTS = WorkloadSpec(("a", "b", "c", "d"), total_rate_rps=20.0, duration_s=600.0,
                       window_s=60.0, arrivals="clients", time_scale=72.0)


def test_client_arrivals_are_bursty_reproducible_and_noted():
    a, b = build_workload(CLIENTS), build_workload(CLIENTS)
    assert np.array_equal(a.arrival_s, b.arrival_s)
    assert any("per-client" in note for note in a.notes)
    assert (np.diff(a.arrival_s) >= 0).all() and a.arrival_s.max() < CLIENTS.duration_s
    assert a.input_tokens.max() <= 1024
    for name in CLIENTS.models:
        assert a.history[name].peak_concurrency.shape == (3, 10)
    # burstier than a Poisson stream of the same rate: per-second counts overdispersed
    first = a.arrival_s[a.model_index == 0]
    counts = np.bincount(first.astype(int), minlength=600)
    assert counts.var() > 2 * counts.mean()


def test_client_arrivals_follow_the_day_and_the_share():
    w = build_workload(WorkloadSpec(("a",), 10.0, 1200.0, window_s=60.0, arrivals="clients",
                                    time_scale=72.0, start_hour=0.0, history_periods=0))
    # a day of m-large in 20 minutes: the rate over the day averages near the 14-day mean
    assert w.num_requests / 1200.0 == pytest.approx(10.0, rel=0.5)


def test_mixed_shapes_replay_clients_only_for_servegen_models():
    w = build_workload(WorkloadSpec(("a", "b"), 10.0, 300.0, shape="mixed", arrivals="clients",
                                    window_s=30.0))
    assert "a" in w.history and "b" not in w.history  # b follows a Functions day
    assert any("Functions-shaped" in note for note in w.notes)
    assert (np.bincount(w.model_index, minlength=2) > 0).all()


def test_repeat_day_replays_the_simulated_day_as_history():
    """Without `repeat_day` each history row is another ServeGen day, with its own volume
    (days differ by up to 1.5x); with it every row is the simulated day's clients drawn
    again."""
    spec = WorkloadSpec(("a", "b", "c"), 30.0, 1200.0, window_s=60.0, start_hour=0.0,
                        arrivals="clients")
    periodic = build_workload(WorkloadSpec(**{**spec.__dict__, "repeat_day": True}))
    assert any("--repeat-day" in note for note in periodic.notes)
    days_apart = []
    for w, same_day in ((build_workload(spec), False), (periodic, True)):
        for name in spec.models:
            today = w.actual[name].rate_rps[0]
            for row in w.history[name].rate_rps:
                gap = np.abs(row - today).sum() / today.sum()  # how far the days' shapes lie
                if same_day:
                    assert gap < 0.15, (name, gap)  # the same day; only the draw differs
                else:
                    days_apart.append(gap)
    assert max(days_apart) > 0.25  # some other day is far from today: the test can tell
    # only the history differs: the requests simulated are the same ones
    plain = build_workload(spec)
    for field in ("arrival_s", "model_index", "input_tokens", "output_tokens"):
        assert np.array_equal(getattr(plain, field), getattr(periodic, field))


def test_days_of_history_change_the_history_alone():
    """The last three days are drawn as they always were and older ones on a stream of their
    own: a week of history keeps the three-day history as its last three rows, and the
    requests simulated are the same however many days come before them."""
    def spec(days):
        return WorkloadSpec(("a", "b"), 20.0, 600.0, window_s=60.0, arrivals="clients",
                            history_periods=days)
    week, three, one = (build_workload(spec(d)) for d in (7, 3, 1))
    for name in ("a", "b"):
        assert week.history[name].rate_rps.shape == (7, 10)
        assert np.array_equal(week.history[name].rate_rps[-3:], three.history[name].rate_rps)
        assert np.array_equal(one.history[name].rate_rps, three.history[name].rate_rps[-1:])
        # the older days are other days of the trace, not copies of the recent ones
        assert not np.array_equal(week.history[name].rate_rps[0], week.history[name].rate_rps[4])
    for w in (one, three):
        for field in ("arrival_s", "model_index", "input_tokens", "output_tokens"):
            assert np.array_equal(getattr(week, field), getattr(w, field))
    assert build_workload(spec(0)).history == {}


@pytest.mark.parametrize("bad", [{"total_rate_rps": 0}, {"duration_s": -1}, {"shape": "x"},
                                 {"models": ()}, {"arrivals": "poisson"}, {"lengths": "chat"},
                                 {"arrivals": "clients", "shape": "functions"},
                                 {"arrivals": "clients", "shape": "flat"},
                                 {"history_periods": -1}, {"history_periods": 14}])
def test_bad_spec(bad):
    fields = {"models": ("a",), "total_rate_rps": 1.0, "duration_s": 10.0} | bad
    with pytest.raises(ValueError):
        WorkloadSpec(**fields)


def test_presets_exist():
    assert {"paper", "scale", "azure-conv", "azure-code", "servegen",
            "azure-functions"} <= set(PRESETS)
    paper = get_preset("paper")
    assert paper.num_gpus == 16 and paper.shapes.count("llama-2-7b") == 2
    with pytest.raises(ValueError, match="unknown workload preset"):
        get_preset("nope")
