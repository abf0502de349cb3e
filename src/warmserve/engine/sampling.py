"""Per-request sampling parameters and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


class InvalidRequestError(ValueError):
    """A request is malformed; the message names the field and the value."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of alternatives per token; None: no logprobs
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        checks = (
            (self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", self.temperature,
             "must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", self.top_k, "must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             self.logprobs, f"must be in [0, {MAX_LOGPROBS}]"),
            (all(s for s in self.stop), "stop", self.stop, "must not hold empty strings"),
        )
        for ok, name, value, rule in checks:
            if not ok:
                raise InvalidRequestError(f"{name}={value!r} {rule}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Picks one token per row of logits, each row with its own parameters.

    Random rows use the exponential-race trick (argmax of p / Exp(1)), which needs no host sync;
    a request with a seed draws its noise from its own generator, so its output is reproducible
    whatever else is in the batch.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[SampledToken]:
        # logits [N, V] float32
        greedy = logits.argmax(dim=-1)
        chosen = greedy
        if not all(p.is_greedy for p in params):
            probs = _filtered_probs(logits, params)
            noise = torch.empty_like(probs).exponential_(generator=self._generator)
            for row, gen in enumerate(generators):
                if gen is not None:
                    noise[row].exponential_(generator=gen)
            drawn = (probs / noise).argmax(dim=-1)
            is_greedy = torch.tensor([p.is_greedy for p in params], device=logits.device)
            chosen = torch.where(is_greedy, greedy, drawn)
        token_ids = chosen.tolist()
        if all(p.logprobs is None for p in params):
            return [SampledToken(t) for t in token_ids]
        return _with_logprobs(logits, token_ids, params)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    scaled = logits / temps[:, None]
    top_ks = [p.top_k for p in params]
    top_ps = [p.top_p for p in params]
    if any(top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = torch.tensor([k if k else vocab for k in top_ks], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
        drop = before >= torch.tensor(top_ps, device=logits.device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    return scaled.softmax(dim=-1)


def _with_logprobs(logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
                   ) -> list[SampledToken]:
    logprobs = logits.log_softmax(dim=-1)
    width = max(p.logprobs or 0 for p in params)
    top_values, top_ids = logprobs.topk(max(width, 1), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0]
    out = []
    for row, (token, p) in enumerate(zip(token_ids, params, strict=True)):
        if p.logprobs is None:
            out.append(SampledToken(token))
            continue
        top = tuple(zip(top_ids[row, : p.logprobs].tolist(),
                        top_values[row, : p.logprobs].tolist(), strict=True))
        out.append(SampledToken(token, float(chosen[row]), top))
    return out
