"""Tokenizer: byte-level synthetic tokenizer, chat templates, incremental detokenizing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmserve.engine.arch import SYNTH_ARCHS
from warmserve.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint):
    return Tokenizer(tiny_checkpoint, SYNTH_ARCHS["tiny"])


def test_byte_tokenizer_round_trips_any_text(tiny_tokenizer):
    text = "héllo, wörld — 你好 🙂"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())
    assert tiny_tokenizer.decode(ids) == text
    assert 257 in tiny_tokenizer.eos_token_ids


def test_incremental_detokenizer_holds_back_partial_characters(tiny_tokenizer):
    text = "a🙂b"
    detok = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detok.add(t) for t in tiny_tokenizer.encode(text, add_special_tokens=False)]
    assert deltas == ["a", "", "", "", "🙂", "b"]
    assert "".join(deltas) == text


def _whole_decode_stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The reference: decode the whole output at every token, hold back a partial character."""
    deltas, text = [], ""
    for end in range(1, len(ids) + 1):
        whole = tokenizer.decode(ids[:end])
        if whole.endswith("\ufffd"):
            deltas.append("")
            continue
        deltas.append(whole[len(text):] if whole.startswith(text) else "")
        text = whole
    return deltas


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert detok.text == "".join(deltas)
    return deltas


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_incremental_detokenizer_streams_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(_stream(tiny_tokenizer, ids)) == text


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_checkpoint):
    from warmserve.engine.checkpoint import read_arch

    return Tokenizer(smollm2_checkpoint, read_arch(smollm2_checkpoint))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49_151), max_size=40))
def test_windowed_detokenizing_equals_decoding_the_whole_output(smollm2_tokenizer, ids):
    """Any ids, byte fragments and special tokens included: each delta is the one that
    decoding the whole output at every token gives (a BPE tokenizer's real vocabulary)."""
    assert _stream(smollm2_tokenizer, ids) == _whole_decode_stream(smollm2_tokenizer, ids)


def test_windowed_detokenizing_of_real_text(smollm2_tokenizer):
    text = "Héllo,  wörld — 你好 🙂🙂 naïve café\n\tend. A long answer " * 20
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(_stream(smollm2_tokenizer, ids)) == smollm2_tokenizer.decode(ids) == text


def test_plain_chat_template(tiny_tokenizer):
    rendered = tiny_tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "user: hi\nassistant:"


def test_smollm2_chat_template(smollm2_checkpoint):
    from warmserve.engine.checkpoint import read_arch

    tok = Tokenizer(smollm2_checkpoint, read_arch(smollm2_checkpoint))
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_end|>", add_special_tokens=False)[0] in tok.eos_token_ids


def test_bad_messages_are_clear(tiny_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] has no 'role'"):
        tiny_tokenizer.render_chat([{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="empty"):
        tiny_tokenizer.render_chat([])


def test_template_raise_exception_is_clear(tmp_path, tiny_checkpoint):
    import json
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('only user messages') }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(path, SYNTH_ARCHS["tiny"])
    with pytest.raises(ChatTemplateError, match="only user messages"):
        tok.render_chat([{"role": "system", "content": "x"}])
