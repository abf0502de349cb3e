"""Tokenizer (Hugging Face `tokenizers`), chat templates (Jinja) and incremental detokenizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from warmserve.engine.arch import ModelArch
from warmserve.engine.sampling import InvalidRequestError

# Used when a checkpoint ships no chat template (synthetic checkpoints, base models).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(InvalidRequestError):
    """Messages could not be rendered by the model's chat template."""


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its chat template and stop tokens."""

    def __init__(self, path: Path, arch: ModelArch) -> None:
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text() if template_file.is_file()
            else config.get("chat_template") or PLAIN_CHAT_TEMPLATE
        )
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = next(t["template"] for t in template if t.get("name") == "default")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos_ids = set(arch.eos_token_ids)
        if self.eos_token and (eos_id := self._tok.token_to_id(self.eos_token)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids = frozenset(eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
                    ) -> str:
        if not messages:
            raise ChatTemplateError("messages is empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ChatTemplateError(f"messages[{i}] has no 'role' string")
            if not isinstance(message.get("content", ""), str):
                raise ChatTemplateError(f"messages[{i}].content must be a string")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes special tokens (BOS) itself.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; holds back incomplete UTF-8.

    A token decodes a short window, not the whole output (which made a sequence's n-th token
    cost O(n), and a step of 256 sequences several ms): the delta is the text of
    `ids[prefix:]` less that of `ids[prefix:read]`, where the ids before `read` are already in
    `text` and those from `prefix` on give the decoder the context of the join (a leading
    space that a decoder strips from a text's first token). Both bounds only move to a point
    where the text was whole, so no window starts inside a character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        after = self._tokenizer.decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing whole yet
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


def write_byte_tokenizer(out: Path, arch: ModelArch) -> None:
    """A byte-level tokenizer (256 byte tokens plus BOS/EOS) for synthetic checkpoints."""
    specials = {"<|bos|>": arch.bos_token_id, "<|eos|>": arch.eos_token_ids[0]}
    vocab = {text: token_id for text, token_id in specials.items() if token_id is not None}
    taken = set(vocab.values())
    free_ids = (i for i in range(arch.vocab_size) if i not in taken)
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = next(free_ids)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": PLAIN_CHAT_TEMPLATE}
    ))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise(message: str) -> None:
    raise TemplateError(message)
