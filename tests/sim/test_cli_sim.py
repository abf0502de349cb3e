"""`warmserve simulate` and `warmserve predict` end to end."""

from __future__ import annotations

import json

import pandas as pd
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
    # WarmServe hands requests over: how many, and the stalls, per run and per request
    assert {"handed_over", "handover_stall_p99_s", "stalled_past_slo"} <= set(data["warmserve"])
    assert "handed_over" not in data["serverlessllm"]
    header = (tmp_path / "out" / "requests-serverlessllm.csv").read_text().splitlines()[0]
    assert header.split(",")[-1] == "stall_s"
    # the timeline: every model's two one-minute windows, the load against its forecast
    timeline = pd.read_csv(tmp_path / "out" / "timeline-warmserve.csv")
    assert len(timeline) == 4 * 2
    assert list(timeline.groupby("model")["window_start_s"].apply(list).iloc[0]) == [0, 60]
    assert (timeline["peak_concurrency"] >= timeline["avg_concurrency"]).all()
    assert timeline["instances_mean"].between(0.5, 16).all()  # every model busy; 16 GPUs
    assert timeline.notna().all().all()


def test_simulate_errors():
    result = runner.invoke(app, ["simulate", "--workload", "nope"])
    assert result.exit_code == 2 and "neither a preset" in result.output
    result = runner.invoke(app, ["simulate", "--policies", "fastest", "--duration", "60"])
    assert result.exit_code == 2 and "unknown policy 'fastest'" in result.output
    result = runner.invoke(app, ["simulate", "--policies", " , ", "--duration", "60"])
    assert result.exit_code == 2 and "name one or more policy sets" in result.output


def test_zero_is_an_error_not_the_preset_default():
    """A zero GPU count, window or rate is refused by name, not silently replaced by the
    preset's value, and so is an infinite or NaN one (they used to crash or run); so is a
    cluster whose nodes cannot hold a model's tensor-parallel group."""
    for args, message in ((["--gpus", "0"], "a cluster needs GPUs: 0 GPUs"),
                          (["--gpus", "10000000"], "10,000,000 GPUs: the simulator holds at most"),
                          (["--rate", "0"], "total_rate_rps=0.0 must be a finite number > 0"),
                          (["--rate", "inf"], "total_rate_rps=inf must be a finite number"),
                          (["--rate", "nan"], "total_rate_rps=nan must be a finite number"),
                          (["--duration", "0"], "duration_s=0.0 must be a finite number > 0"),
                          (["--duration", "inf"], "duration_s=inf must be a finite number"),
                          (["--time-scale", "inf"], "time_scale=inf must be a finite number"),
                          (["--seed", "-1"], "seed=-1 must be >= 0"),
                          (["--rate", "1e7"], "is 1.2e+10 requests, more than the 50,000,000"),
                          (["--gpus-per-node", "2"], "'llama-2-70b' runs on 4 GPUs of one node")):
        result = runner.invoke(app, ["simulate", "--workload", "paper", *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), args
    result = runner.invoke(app, ["predict", "--workload", "paper", "--window", "1e-6"])
    assert result.exit_code == 2 and "is 1.2e+09 forecast windows, more than the 20,000" in \
        " ".join(result.output.split())
    for window in ("0", "nan"):
        result = runner.invoke(app, ["predict", "--workload", "paper", "--window", window])
        assert result.exit_code == 2 and f"window_s={float(window)} must be a finite number > 0" \
            in " ".join(result.output.split())


def test_bad_profile_slo_and_out_are_refused_before_any_run(tmp_path):
    """A profile that is not there or lacks a key, a negative SLO, or an --out that is a file:
    each is named, and nothing is simulated first (an --out error used to come after the
    runs, losing them)."""
    bad = tmp_path / "p.yaml"
    bad.write_text("device: x\nmodels:\n  a: {tp: 1}\n")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for args, message in ((["--profile", "nope"], "cost profile 'nope' is neither a file"),
                          (["--profile", str(bad)], "missing key models.a.weight_gb"),
                          (["--slo", "-1"], "--slo"),
                          (["--profile-set", "engine_init_s"], "expected KEY=NUMBER"),
                          (["--profile-set", "warp=1"], "no top-level cost 'warp' to override"),
                          (["--slo", "inf"], "inf: the TTFT SLO must be a finite number"),
                          (["--slo", "0"], "0.0: the TTFT SLO must be a finite number"),
                          (["--out", str(afile)], "exists and is not a folder")):
        result = runner.invoke(app, ["simulate", "--workload", "paper", "--duration", "30",
                                     *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), args
    assert afile.read_text() == "keep me"


def test_predict_json():
    result = runner.invoke(app, ["predict", "--workload", "paper", "--json"])
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["overall"]
    assert {"peak_mre", "avg_mre", "naive_last_window_peak_mre",
            "naive_same_slot_yesterday_peak_mre"} <= set(overall)


def test_predict_scores_an_oracle_over_replays_and_refuses_it_for_a_request_file(tmp_path):
    """The oracle (mean of other seeds' replays of the same shape) is the floor: on `paper` it
    is below the forecaster and the naive predictors. A request file has no other replays."""
    result = runner.invoke(app, ["predict", "--workload", "paper", "--oracle-replays", "3",
                                 "--json"])
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["overall"]
    assert 0 < overall["oracle_peak_mre"] < overall["peak_mre"]
    assert overall["oracle_peak_mre"] < overall["naive_last_window_peak_mre"]
    path = tmp_path / "req.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n"
                    + "".join(f"{i * 0.1:.1f},llama-2-7b-a,100,50\n" for i in range(50)))
    result = runner.invoke(app, ["predict", "--workload", str(path), "--oracle-replays", "2"])
    assert result.exit_code != 0 and "--oracle-replays needs a preset" in result.output


def test_predict_shows_the_models_with_history_apart_where_some_have_none():
    result = runner.invoke(app, ["predict", "--workload", "scale", "--duration", "600"])
    assert result.exit_code == 0, result.output
    assert "with history (32)" in result.output
    result = runner.invoke(app, ["predict", "--workload", "paper"])
    assert result.exit_code == 0 and "with history" not in result.output


def test_predict_json_is_strict_json_where_a_model_has_no_load(tmp_path):
    """A model of the config with no request in the file has no error to report: None, not
    NaN, which is not JSON."""
    path = tmp_path / "req.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n"
                    + "".join(f"{i * 0.5:.1f},llama-2-7b-a,100,50\n" for i in range(400)))
    result = runner.invoke(app, ["predict", "--workload", str(path), "--window", "20", "--json"])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"{constant} in the JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["models"]["llama-2-70b"]["peak_mre"] is None
    assert report["models"]["llama-2-7b-a"]["peak_mre"] is not None
    result = runner.invoke(app, ["predict", "--workload", str(path), "--window", "1000"])
    assert result.exit_code == 0 and "nothing scored" in result.output


def test_predict_in_real_time_uses_the_given_time_scale_and_refuses_it_for_a_request_file(
        tmp_path):
    """--time-scale 1 replays the traces' days in real time: an hour in 5-minute windows is 12
    windows of the forecast, each as long as the paper's. A request file keeps its own time."""
    result = runner.invoke(app, ["predict", "--workload", "paper", "--time-scale", "1",
                                 "--duration", "3600", "--window", "300", "--json"])
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    assert {m["windows"] for m in models.values()} == {12}
    path = tmp_path / "req.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n0.5,llama-2-7b-a,100,50\n")
    result = runner.invoke(app, ["predict", "--workload", str(path), "--time-scale", "1"])
    assert result.exit_code == 2 and "given: time scale" in result.output
    result = runner.invoke(app, ["simulate", "--workload", str(path), "--rate", "5"])
    assert result.exit_code == 2 and "(given: rate)" in result.output
    result = runner.invoke(app, ["simulate", "--workload", str(path), "--seed", "3"])
    assert result.exit_code == 2 and "(given: seed)" in " ".join(result.output.split())


def test_predict_where_days_repeat_beats_yesterday_and_names_bad_arrivals(tmp_path):
    """--repeat-day makes every day of history the simulated one drawn again: the same slot
    yesterday becomes a fair predictor, and the forecaster, which averages three such days,
    beats it. --arrivals switches the arrival process; a preset without ServeGen's shape
    has no clients to replay, and a request file keeps its own arrivals."""
    result = runner.invoke(app, ["predict", "--workload", "paper", "--repeat-day", "--json"])
    assert result.exit_code == 0, result.output
    periodic = json.loads(result.stdout)["overall"]
    result = runner.invoke(app, ["predict", "--workload", "paper", "--json"])
    real = json.loads(result.stdout)["overall"]
    assert periodic["naive_same_slot_yesterday_peak_mre"] < real[
        "naive_same_slot_yesterday_peak_mre"]
    assert periodic["peak_mre"] < periodic["naive_same_slot_yesterday_peak_mre"]
    result = runner.invoke(app, ["predict", "--workload", "paper", "--arrivals", "azure",
                                 "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", "--workload", "azure-conv", "--arrivals", "clients"])
    assert result.exit_code == 2 and "needs shape='servegen' or 'mixed', not 'flat'" in (
        " ".join(result.output.split()))
    path = tmp_path / "req.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n0.5,llama-2-7b-a,100,50\n")
    result = runner.invoke(app, ["simulate", "--workload", str(path), "--repeat-day",
                                 "--arrivals", "azure", "--history-days", "7"])
    assert result.exit_code == 2 and "(given: arrivals, repeat day, history days)" in " ".join(
        result.output.split())


def test_predict_takes_the_days_of_history_asked_for():
    """--history-days sets the seasonal baseline's depth; the load forecast is the same
    one (the naive last window does not move), and more days than ServeGen holds, or a
    negative count, is refused by name. The models forecast by the same slot's mean alone
    are named."""
    overall, models = {}, {}
    for days in ("1", "7"):
        result = runner.invoke(app, ["predict", "--workload", "paper", "--repeat-day",
                                     "--history-days", days, "--json"])
        assert result.exit_code == 0, result.output
        overall[days] = json.loads(result.stdout)["overall"]
        models[days] = json.loads(result.stdout)["models"]
    assert overall["1"]["naive_last_window_peak_mre"] == overall["7"][
        "naive_last_window_peak_mre"]
    assert overall["1"]["peak_mre"] != overall["7"]["peak_mre"]
    # with a week of repeating days the backtest finds them repeating for some model, and
    # the table says which; on the preset's own days, for none
    alone = [m for m, row in models["7"].items() if row["same_slot_mean_alone"]]
    assert alone
    result = runner.invoke(app, ["predict", "--workload", "paper", "--repeat-day",
                                 "--history-days", "7"])
    assert "same slot's mean alone" in result.output and alone[0] in result.output
    result = runner.invoke(app, ["predict", "--workload", "paper", "--json"])
    assert not any(row["same_slot_mean_alone"]
                   for row in json.loads(result.stdout)["models"].values())
    for bad in ("14", "-1"):
        result = runner.invoke(app, ["predict", "--workload", "paper", "--history-days", bad])
        assert result.exit_code == 2 and "--history-days" in result.output


def test_a_profile_cost_set_on_the_command_line_changes_the_baseline_alone():
    """The engine start is charged to cold starts (ServerlessLLM's); WarmServe starts none."""
    def p99(*extra):
        result = runner.invoke(app, ["simulate", "--workload", "paper", "--duration", "300",
                                     "--policies", "warmserve,serverlessllm", "--json", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        return summary["warmserve"]["ttft_p99_s"], summary["serverlessllm"]["ttft_p99_s"]

    ws, sllm = p99()
    ws_slow, sllm_slow = p99("--profile-set", "engine_init_s=30")
    assert ws_slow == ws and sllm_slow > sllm
