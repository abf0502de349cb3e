"""Trace loaders: the shipped files load; bad files name the file and line; skips are counted."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from warmserve.workload.traces import (
    TraceError,
    load_azure_functions,
    load_azure_llm,
    load_request_file,
    load_servegen_clients,
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


def test_shipped_servegen_clients_sum_to_the_aggregate():
    clients, rates = load_servegen_clients(), load_servegen_rates()
    for model in ("m-large", "m-mid", "m-small"):
        c = clients[model]
        assert c.mean_rate == pytest.approx(rates[model].mean(), rel=1e-4)
        assert (np.diff(c.window) >= 0).all() and (c.rate > 0).all() and (c.shape > 0).all()
        window = np.bincount(c.window, weights=c.rate, minlength=2016)
        assert window == pytest.approx(rates[model], rel=1e-3, abs=1e-6)
        rows = c.rows_in(100, 101)
        assert (c.window[rows] == 100).all()


def test_servegen_clients_errors(tmp_path):
    header = "model,client,window_start_s,rate,cv,pattern,p1,p2\n"
    good = "m,0,600,0.5,2.0,Gamma,0.25,8.0\nm,1,600,0,0,,0,0\nm,1,0,0.1,1,Weibull,0.5,1\n"
    path = tmp_path / "c.csv.gz"
    path.write_bytes(gzip.compress((header + good).encode()))
    c = load_servegen_clients(path)["m"]
    assert c.window.tolist() == [0, 1] and c.client.tolist() == [1, 0]  # idle row dropped
    assert c.pattern.tolist() == [2, 1] and c.shape.tolist() == [0.5, 0.25]
    path.write_bytes(gzip.compress((header + good).encode())[:-30])  # truncated archive
    with pytest.raises(TraceError, match=r"c\.csv\.gz:\d+: unreadable"):
        load_servegen_clients(path)
    plain = tmp_path / "c.csv"
    plain.write_text(header + "m,0,600,0.5,2.0,Pareto,1,1\n")
    with pytest.raises(TraceError, match=r"c\.csv:2: .*Pareto"):
        load_servegen_clients(plain)
    plain.write_text(header + "m,0,9999999,0.5,2.0,Gamma,1,1\n")
    with pytest.raises(TraceError, match=r"c\.csv:2: .*outside"):
        load_servegen_clients(plain)
    plain.write_text(header + "m,0,0,0.5,2.0,Gamma,0,1\n")
    with pytest.raises(TraceError, match=r"c\.csv:2: Gamma shape"):
        load_servegen_clients(plain)


def test_truncated_row_names_file_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.1,12\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: expected 3 fields"):
        load_azure_llm(path)


def test_bytes_that_are_not_utf8_name_their_line_and_a_bom_is_dropped(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"arrival_s,model,input_tokens,output_tokens\n1.0,a,10,5\n2.0,\xe9,10,5\n")
    with pytest.raises(TraceError, match=r"r\.csv:3: not UTF-8 text \(byte 0xe9 at column 5\)"):
        load_request_file(path)
    path.write_bytes(b"\xef\xbb\xbfarrival_s,model,input_tokens,output_tokens\n1.0,a,10,5\n")
    assert load_request_file(path).model == ["a"]


_MINUTES = "HashFunction," + ",".join(f"minute_{m}" for m in range(1, 1441))


@pytest.mark.parametrize("loader, text, message", [
    (load_azure_llm, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,"
     "44\n2023-11-16 18:15:47.1,12,many\n", r"t\.csv:3: GeneratedTokens 'many' is not an integer"),
    (load_azure_llm, "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,374,44\n",
     r"t\.csv:2: TIMESTAMP 'yesterday' is not an ISO"),
    (load_servegen_rates, "model,window_start_s,total_rate_rps\nm,0,1.5\nm,600,nan\n",
     r"t\.csv:3: total_rate_rps 'nan' is not a finite"),
    (load_servegen_clients, "model,client,window_start_s,rate,pattern,p1\nm,0,600,inf,Gamma,1\n",
     r"t\.csv:2: rate 'inf' is not a finite number"),
    (load_azure_functions, _MINUTES + "\nf," + ",".join(
        "1.5" if m == 500 else str(m) for m in range(1, 1441)) + "\n",
     r"t\.csv:2: minute_500 '1\.5' is not an integer"),
])
def test_bad_numbers_name_file_line_and_column(tmp_path, loader, text, message):
    """Every loader names the field that is not a number, and refuses NaN and infinity."""
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        loader(path)


def test_bad_value_and_missing_header(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n0.5,a,10,x\n")
    with pytest.raises(TraceError, match=r"r\.csv:2: output_tokens 'x' is not an integer"):
        load_request_file(path)
    path.write_text("arrival_s,model,input_tokens,output_tokens\n0.5,a,10,3\nnan,a,10,3\n")
    with pytest.raises(TraceError, match=r"r\.csv:3: arrival_s 'nan' is not a finite number"):
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


def test_skipped_rows_are_reported_with_the_first_ones_line_and_reason(tmp_path, caplog):
    path = tmp_path / "r.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n"
                    "1.0,a,20,7\n-2.0,a,5,5\n3.0,a,5,0\n")
    with caplog.at_level("WARNING", logger="warmserve.workload.traces"):
        assert load_request_file(path).skipped == 2
    assert "skipped 2 unusable rows (the first, line 3: arrival_s -2.0 is negative)" \
        in caplog.text
    path.write_text("arrival_s,model,input_tokens,output_tokens\n4.0,,5,5\n5.0,a,0,1\n")
    with pytest.raises(TraceError, match=r"no usable requests \(2 rows skipped; the first, "
                                         r"line 2: no model\)"):
        load_request_file(path)
    path.write_text("arrival_s,model,input_tokens,output_tokens\n")
    with pytest.raises(TraceError, match=r"no usable requests \(no data rows\)"):
        load_request_file(path)
