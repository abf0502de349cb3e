"""Trace loaders: the shipped files load; bad files name the file and line; skips are counted."""

from __future__ import annotations

import pytest

from warmserve.workload.traces import (
    TraceError,
    load_azure_functions,
    load_azure_llm,
    load_request_file,
    load_servegen_rates,
)


def test_shipped_azure_llm_traces():
    conv, code = load_azure_llm("conv"), load_azure_llm("code")
    assert len(conv.arrival_s) == 19366 and len(code.arrival_s) == 8819
    assert conv.arrival_s[0] == 0 and (conv.arrival_s[1:] >= conv.arrival_s[:-1]).all()
    assert 3400 < conv.duration_s < 3600
    assert code.input_tokens.mean() > conv.input_tokens.mean()  # code prompts are longer


def test_shipped_servegen_and_functions():
    rates = load_servegen_rates()
    assert {len(rates[m]) for m in ("m-large", "m-mid", "m-small")} == {2016}  # 14 days
    counts = load_azure_functions()
    assert counts.shape == (1000, 1440) and counts.sum() == 608228
    assert counts[0].sum() >= counts[1].sum()  # busiest first


def test_truncated_row_names_file_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.1,12\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: expected 3 fields"):
        load_azure_llm(path)


def test_bad_value_and_missing_header(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n0.5,a,10,x\n")
    with pytest.raises(TraceError, match=r"r\.csv:2: invalid literal"):
        load_request_file(path)
    path.write_text("time,model\n1,a\n")
    with pytest.raises(TraceError, match="header lacks column"):
        load_request_file(path)
    with pytest.raises(TraceError, match="cannot open"):
        load_request_file(tmp_path / "missing.csv")


def test_request_file_sorts_counts_skips_and_ignores_extra_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens,note\n"
                    "2.0,b,10,5,x\n1.0,a,20,7,y\n3.0,a,0,5,zero input\n4.0,,5,5,no model\n")
    requests = load_request_file(path)
    assert requests.arrival_s.tolist() == [1.0, 2.0]
    assert requests.model == ["a", "b"]
    assert requests.skipped == 2
