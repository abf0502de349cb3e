"""SSEChunks: a streamed request's server-sent events, its middle chunks from a template."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from warmserve.engine.engine import RequestOutput
from warmserve.engine.sequence import FinishReason
from warmserve.server.app import SSEChunks


def parse(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):-2])


@given(model=st.text(), request_id=st.text(), drawn=st.text(),
       kind=st.sampled_from(["chat.completion", "text_completion"]))
def test_a_middle_chunk_is_the_whole_chunk_encoded(model, request_id, drawn, kind):
    # any text, the template's own stand-in and JSON's specials included, in any name
    for text in (drawn, "\x00text\x00", '"}]}\n\n'):
        event = SSEChunks(model, kind, request_id, 7).format(RequestOutput("r", [1], text))
        choice = {"index": 0, "finish_reason": None, "logprobs": None}
        if kind == "chat.completion":
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        assert parse(event) == {
            "id": request_id, "created": 7, "model": model, "choices": [choice],
            "object": "chat.completion.chunk" if kind == "chat.completion" else kind}


def test_the_first_chunk_names_the_role_and_the_last_its_finish_reason():
    chunks = SSEChunks("m", "chat.completion", "chatcmpl-1", 7)
    first = parse(chunks.format(RequestOutput("r", [1], "Hi"), role=True))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    last = parse(chunks.format(RequestOutput("r", [2], ".", finished=True,
                                             finish_reason=FinishReason.LENGTH)))
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["delta"] == {"content": "."}
