"""The command line, through typer's runner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from warmserve.cli import app

runner = CliRunner()


def test_help_lists_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output


def test_models_list_json(tmp_path):
    result = runner.invoke(app, ["--cache-dir", str(tmp_path), "models", "list", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [m["name"] for m in data["models"]] == ["smollm2-135m-instruct",
                                                   "smollm2-135m-instruct-b"]


def test_models_synth_then_generate(tmp_path):
    result = runner.invoke(app, ["--cache-dir", str(tmp_path), "models", "synth", "tiny"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "models:\n  - {name: tiny, checkpoint: 'synth:tiny', dtype: float32, max_context: 256}\n"
        "engine: {kv_cache_gib: 0.01}\n")
    result = runner.invoke(app, ["--cache-dir", str(tmp_path), "models", "generate", "tiny",
                                 "--config", str(config), "--max-tokens", "5", "--no-chat",
                                 "-p", "abc"])
    assert result.exit_code == 0, result.output
    assert "5 tokens" in result.output


def test_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["--log-level", "loud", "models", "list"])
    assert result.exit_code == 2 and "log level 'loud'" in result.output
    result = runner.invoke(app, ["models", "list", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "neither a file nor a built-in name" in result.output
    result = runner.invoke(app, ["models", "generate", "nope"])
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output
    for device, message in (("tpu", "device 'tpu': expected cpu or cuda[:N]"),
                            ("cuda:64", "device 'cuda:64': ")):  # no CUDA, or not 64 devices
        result = runner.invoke(app, ["--cache-dir", str(tmp_path), "models", "generate",
                                     "--device", device])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), device
    result = runner.invoke(app, ["models", "import", "synth:tiny"])
    assert result.exit_code == 2 and "expected gguf:FILE or package:NAME" in result.output
    result = runner.invoke(app, ["--cache-dir", str(tmp_path), "models", "synth", "gpt-9"])
    assert result.exit_code == 2 and "unknown synthetic shape" in result.output
    result = runner.invoke(app, ["serve", "--policy", "warmserve-no-prewarm"])
    output = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "(this one is simulated only)" in output
    result = runner.invoke(app, ["serve", "--policy", "fastest"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "the live system runs warmserve, warmserve-goodput" in output


def test_bench_refuses_bad_options_before_contacting_the_endpoint():
    """Nothing listens on the URL: each bad option is named before a connection is tried."""
    for args, message in ((["--slo", "-1"], "the TTFT SLO must be a finite number"),
                          (["--slo", "nan"], "the TTFT SLO must be a finite number"),
                          (["--max-input-tokens", "0"], "--max-input-tokens"),
                          (["--max-output-tokens", "-3"], "--max-output-tokens"),
                          (["--duration", "inf"], "duration_s=inf must be a finite number")):
        result = runner.invoke(app, ["bench", "--url", "http://127.0.0.1:9", *args])
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and message in output, (args, output)


def test_serve_refuses_a_busy_port_and_a_bad_history_before_starting_workers(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in output
    assert "starting" not in output
    history = tmp_path / "h.csv"
    history.write_text("model,avg_concurrency,peak_concurrency,rate_rps\nnope,1,2,3\n")
    result = runner.invoke(app, ["serve", "--history", str(history)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "model 'nope' is not served" in output
    assert "starting" not in output


def test_an_error_message_is_printed_as_it_is():
    """No rich markup or emoji codes in what the user typed: '[bold]' and ':-1:' stay."""
    result = runner.invoke(app, ["simulate", "--workload", "x:-1:[bold]y"])
    assert result.exit_code == 2 and "workload 'x:-1:[bold]y' is neither" in result.output


def test_serve_refuses_a_config_whose_cuda_devices_this_machine_lacks(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("cluster:\n  nodes:\n    - name: n\n      devices:\n"
                      "        - {type: cuda, count: 64, memory_gib: 80}\n"
                      "models:\n  - {name: t, checkpoint: 'synth:tiny'}\n")
    result = runner.invoke(app, ["serve", "--config", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "a node of 64 CUDA device(s), and this machine has" in output
    assert "starting" not in output  # no worker was started to crash

