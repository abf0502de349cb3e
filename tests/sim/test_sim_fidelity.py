"""benchmarks/sim_fidelity.py: the replayed requests follow the preset's token caps, and the
comparison simulates exactly the requests the engine served."""

from __future__ import annotations

import argparse
import csv

import numpy as np
from benchmarks.sim_fidelity import MAX_INPUT, MAX_OUTPUT, compare, requests


def test_requests_are_poisson_with_capped_trace_lengths():
    reqs = requests(rate=20.0, duration_s=30.0, seed=1)
    arrivals = np.array([a for a, _, _ in reqs])
    assert 450 < len(reqs) < 750 and np.all(np.diff(arrivals) > 0) and arrivals[-1] < 30.0
    assert all(1 <= n_in <= MAX_INPUT and 2 <= n_out <= MAX_OUTPUT for _, n_in, n_out in reqs)
    assert reqs == requests(rate=20.0, duration_s=30.0, seed=1)


def test_compare_simulates_the_replayed_requests(tmp_path, capsys):
    with open(tmp_path / "replay_4.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "model", "input_tokens", "output_tokens", "ttft_s", "tpot_s"])
        for a, n_in, n_out in requests(rate=4.0, duration_s=20.0, seed=0):
            w.writerow([a, "llama-2-7b", n_in, n_out, 0.05, 0.01])
    compare(argparse.Namespace(dir=str(tmp_path), profile="h100"))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("4 ")]
    assert [r[1] for r in rows] == ["TTFT", "TPOT"]
    ttft, tpot = rows
    assert float(ttft[2]) == 50.0 and float(tpot[2]) == 10.0  # the measured means, in ms
    # simulated: a lightly loaded 7B, prefill of up to 1,024 tokens and a decode step
    assert 5.0 < float(ttft[6]) < 60.0 and 6.0 < float(tpot[6]) < 12.0
