"""benchmarks/fit_profile.py: a model timed in slices of its depth, fitted to the whole."""

from __future__ import annotations

import json
import re

import pytest
from benchmarks.fit_profile import fit, main


def _run(layers: int, full: int = 80) -> dict:
    """Timings that grow exactly linearly with depth (seconds)."""
    return {"shape": "llama-2-70b", "layers": layers, "full_layers": full, "device": "test",
            "ttft_512_s": 0.002 + 0.001 * layers, "ttft_2048_s": 0.003 + 0.004 * layers,
            "tpot_b1_s": 0.001 + 0.0006 * layers, "tpot_b32_s": 0.0012 + 0.0007 * layers}


def test_slices_are_fitted_per_layer_and_read_at_full_depth():
    f = fit([_run(10), _run(20)])
    assert f["ttft"] == [(512, pytest.approx(0.082)), (2048, pytest.approx(0.323))]
    per_token = (0.323 - 0.082) / 1536
    assert f["prefill_s_per_token"] == pytest.approx(per_token)
    assert f["prefill_base_s"] == pytest.approx(0.082 - 512 * per_token)
    assert f["decode_base_s"] == pytest.approx(0.049)  # batch 1 at 80 layers
    assert f["decode_per_seq_s"] == pytest.approx((0.0572 - 0.049) / 31)


def test_a_whole_model_run_is_taken_as_it_is_and_one_slice_is_refused():
    whole = fit([_run(80)])
    assert whole["ttft"][0][1] == pytest.approx(0.082)
    with pytest.raises(SystemExit, match="one run of 10 layers: give runs at two depths"):
        fit([_run(10)])


def test_the_printed_entry_spreads_the_fit_over_more_gpus(tmp_path, monkeypatch, capsys):
    paths = []
    for layers in (10, 20):
        paths.append(tmp_path / f"l{layers}.json")
        paths[-1].write_text(json.dumps(_run(layers)))

    def entry(tp: int) -> dict[str, float]:
        monkeypatch.setattr("sys.argv", ["fit_profile.py", *map(str, paths), "--tp", str(tp)])
        main()
        text = capsys.readouterr().out
        assert f"tp: {tp}," in text and "llama-2-70b:" in text
        return {k: float(v) for k, v in re.findall(r"(\w+_(?:ms|us_per_token)): ([\d.]+)", text)}

    one, four = entry(1), entry(4)
    assert one["decode_base_ms"] == pytest.approx(49.0, abs=0.01)
    assert one["prefill_us_per_token"] == pytest.approx(156.9, abs=0.1)  # 0.241 s / 1,536
    assert four["prefill_us_per_token"] < one["prefill_us_per_token"] / 2
    assert four["decode_base_ms"] < one["decode_base_ms"]


def test_runs_of_different_shapes_are_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run(10)))
    b.write_text(json.dumps(_run(20) | {"shape": "llama-2-13b"}))
    monkeypatch.setattr("sys.argv", ["fit_profile.py", str(a), str(b)])
    with pytest.raises(SystemExit, match="one --shape"):
        main()
