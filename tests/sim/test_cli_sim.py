"""`warmserve simulate` and `warmserve predict` end to end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from warmserve.cli import app

runner = CliRunner()
KEYS = {"ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s", "completed",
        "dropped", "throughput_rps", "slo_attainment", "gpu_seconds_busy", "cold_starts",
        "prewarm_hits"}


def test_simulate_json_and_outputs(tmp_path):
    result = runner.invoke(app, ["simulate", "--workload", "paper", "--duration", "120",
                                 "--policies", "warmserve,serverlessllm", "--jobs", "1",
                                 "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"warmserve", "serverlessllm"}
    assert set(data["warmserve"]) >= KEYS
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"summary.json", "ttft_cdf.png", "requests-warmserve.csv",
            "timeline-serverlessllm.png"} <= files


def test_simulate_errors():
    result = runner.invoke(app, ["simulate", "--workload", "nope"])
    assert result.exit_code == 2 and "neither a preset" in result.output
    result = runner.invoke(app, ["simulate", "--policies", "fastest", "--duration", "60"])
    assert result.exit_code == 2 and "unknown policy 'fastest'" in result.output


def test_predict_json():
    result = runner.invoke(app, ["predict", "--workload", "paper", "--json"])
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["overall"]
    assert {"peak_mre", "avg_mre", "naive_last_window_peak_mre",
            "naive_same_slot_yesterday_peak_mre"} <= set(overall)
