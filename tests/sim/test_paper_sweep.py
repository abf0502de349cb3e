"""benchmarks/paper_sweep.py: capacity is read off the swept rates as documented."""

from __future__ import annotations

import pytest
from benchmarks.paper_sweep import _capacity, main


def test_capacity_interpolates_between_the_rates_where_attainment_crosses_the_bar():
    rates = [10.0, 20.0, 30.0]
    assert _capacity(rates, [1.0, 0.95, 0.85], 0.90) == "25"  # halfway from 0.95 to 0.85
    assert _capacity(rates, [1.0, 0.99, 0.98], 0.90) == "> 30"  # holds at the highest rate
    assert _capacity(rates, [0.80, 0.70, 0.60], 0.90) == "< 10"  # not even at the lowest


@pytest.mark.parametrize("args, message", [
    (["--rates", "20,x"], "not a comma-separated list of floats"),
    (["--rates", "0"], "each > 0"),
    (["--seeds", ""], "give one or more"),
    (["--policies", "warmserve,fastest"], "unknown policy 'fastest'"),
    (["--workload", "nope"], "neither a preset"),
    (["--profile-set", "engine_init_s"], "'engine_init_s' is not KEY=NUMBER"),
    (["--profile-set", "warp_speed=9"], "no top-level cost 'warp_speed' to override"),
    (["--plot", "no/such/folder/a.png"], "no folder no/such/folder"),
])
def test_bad_arguments_are_refused_by_name(monkeypatch, capsys, args, message):
    monkeypatch.setattr("sys.argv", ["paper_sweep.py", "--rates", "20", "--seeds", "0", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_plot_is_written_with_the_tables(monkeypatch, capsys, tmp_path):
    plot = tmp_path / "attainment.png"
    monkeypatch.setattr("sys.argv", ["paper_sweep.py", "--rates", "4,8", "--seeds", "0",
                                     "--policies", "dedicated", "--plot", str(plot)])
    main()
    out = capsys.readouterr().out
    assert "| dedicated | > 8 | > 8 |" in out and f"wrote {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
