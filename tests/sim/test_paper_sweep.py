"""benchmarks/paper_sweep.py: capacity is read off the swept rates as documented."""

from __future__ import annotations

from benchmarks.paper_sweep import _capacity


def test_capacity_interpolates_between_the_rates_where_attainment_crosses_the_bar():
    rates = [10.0, 20.0, 30.0]
    assert _capacity(rates, [1.0, 0.95, 0.85], 0.90) == "25"  # halfway from 0.95 to 0.85
    assert _capacity(rates, [1.0, 0.99, 0.98], 0.90) == "> 30"  # holds at the highest rate
    assert _capacity(rates, [0.80, 0.70, 0.60], 0.90) == "< 10"  # not even at the lowest
