"""The synchronous engine: requests in, token outputs out; `step()` is schedule, run, process.

`create_engine` builds one from a checkpoint directory. The threaded, async-friendly front is
`warmserve.engine.loop.EngineLoop`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from warmserve.config import EngineConfig
from warmserve.engine.arch import ModelArch
from warmserve.engine.block_manager import BlockManager
from warmserve.engine.checkpoint import DTYPES, read_arch
from warmserve.engine.loader import TensorProvider, TorchProvider, build_model, connect
from warmserve.engine.parallel import Shard, TensorParallel
from warmserve.engine.runner import ModelRunner
from warmserve.engine.sampling import InvalidRequestError, SampledToken, SamplingParams
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.sequence import FinishReason, Sequence
from warmserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; `finished` on the last one)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    resume: Resume | None = None  # on a request handed over (FinishReason.HANDOVER)

    def __reduce__(self) -> tuple:
        # Pickled as its fields alone: every stream's output crosses the worker RPC at every
        # step, and a dataclass's default pickle (its __dict__, by name) took 1.5x as long
        # to write and 2.4x as long to read.
        return (RequestOutput, (self.request_id, self.token_ids, self.text, self.logprobs,
                                self.finished, self.finish_reason, self.num_prompt_tokens,
                                self.num_output_tokens, self.error, self.resume))


@dataclass
class Resume:
    """Where a handed-over request got to, for another engine to go on from (as its prompt):
    its prompt and output tokens, how many of those are output, and how much of the output's
    text was sent (the rest, held back by the detokenizer, is sent by the next engine)."""

    token_ids: list[int]
    num_output_tokens: int
    text_sent: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocked: int  # waiting for free KV blocks (see Scheduler.num_blocked)
    num_blocks_free: int
    num_blocks_usable: int
    num_blocks_lent: int
    num_preemptions: int
    tokens_per_s: float
    # Cumulative since the engine started, for the controller's prefill-aware load signal
    # and its overload control: prompt tokens of the requests added, prompt tokens prefilled
    # and the seconds that took (a step's time split between its prefill and decode tokens),
    # seconds spent executing steps, requests finished.
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    busy_s: float = 0.0
    finished: int = 0


class _TextState:
    """Detokenizes one request's output and applies its stop strings, holding back any text
    that could still turn into a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0
        self.stopped = False  # a stop string ended the text; nothing after it is emitted

    def add(self, token_id: int) -> tuple[str, bool]:
        self.detok.add(token_id)
        text = self.detok.text
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                self.stopped = True
                return self._emit(at), True
        return self._emit(max(self.emitted, len(text) - self.hold)), False

    def flush(self) -> str:
        return self._emit(len(self.detok.text))

    def _emit(self, end: int) -> str:
        delta = self.detok.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer,
                 max_context: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._clock = clock
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[str, _TextState] = {}
        self._prior_output: dict[str, int] = {}  # resumed requests: output in their prompt
        self._num_preemptions = 0
        self._token_times: list[tuple[float, int]] = []
        self._last_step: dict[str, float | int] = {}
        self._work = {"prompt_tokens": 0, "prefill_tokens": 0, "prefill_s": 0.0, "busy_s": 0.0,
                      "finished": 0}
        self.last_step_ran = False  # whether the latest step ran, finished or preempted anything

    @property
    def block_manager(self) -> BlockManager:
        return self.scheduler.block_manager

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if this request can never run; touches no state."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        if n + params.max_tokens > self.max_context:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.runner.model.arch.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt holds token ids outside the vocabulary: {bad[:5]}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resume: Resume | None = None) -> None:
        """Queue a request. A `resume` (a request handed over by another engine, its
        `prompt_token_ids` the resume's) goes on where it got to: the output it has is fed to
        the detokenizer, and only text not sent yet is sent."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, self._clock())
        if params.seed is not None:
            seq.generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        self._seqs[request_id] = seq
        text = self._text[request_id] = _TextState(self.tokenizer, params.stop)
        if resume is not None and resume.num_output_tokens:
            for token_id in prompt_token_ids[-resume.num_output_tokens:]:
                text.detok.add(token_id)
            text.emitted = resume.text_sent
            self._prior_output[request_id] = resume.num_output_tokens
        self._work["prompt_tokens"] += len(prompt_token_ids)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return self._final(seq, [], "")

    def hand_over_all(self) -> list[RequestOutput]:
        """Stop every request, each to go on elsewhere: its last output says where it got to
        (FinishReason.HANDOVER, with the tokens to resume from)."""
        outputs = []
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq, FinishReason.HANDOVER)
            sent = self._text[seq.request_id].emitted  # what the detokenizer holds goes on
            self._text[seq.request_id].stopped = True  # elsewhere: not flushed here
            prior = self._prior_output.get(seq.request_id, 0)
            output = self._final(seq, [], "")
            output.resume = Resume(seq.prompt_token_ids + seq.output_token_ids,
                                   prior + len(seq.output_token_ids), sent)
            outputs.append(output)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        self._num_preemptions += len(sched.preempted)
        outputs = [self._final(seq, [], "") for seq in sched.evicted]
        self._last_step = {"schedule_s": t1 - t0, "decodes": len(sched.decodes),
                           "prefills": len(sched.prefills),
                           "prefill_tokens": sum(n for _, n in sched.prefills),
                           "preempted": len(sched.preempted)}
        self.last_step_ran = not sched.is_empty or bool(sched.evicted or sched.preempted)
        if sched.is_empty:
            return outputs
        sample_seqs = sched.sequences_to_sample()
        sampled = self.runner.execute(sched, sample_seqs)
        execute_s = time.perf_counter() - t1
        self._last_step["execute_s"] = execute_s
        self._account(execute_s, int(self._last_step["prefill_tokens"]), len(sched.decodes))
        self.scheduler.postprocess(sched)
        self._count_tokens(len(sampled))
        for seq, token in zip(sample_seqs, sampled, strict=True):
            outputs.append(self._append(seq, token))
        return outputs

    def _account(self, execute_s: float, prefill_tokens: int, decodes: int) -> None:
        work = self._work
        work["busy_s"] += execute_s
        if prefill_tokens:
            work["prefill_tokens"] += prefill_tokens
            work["prefill_s"] += execute_s * prefill_tokens / (prefill_tokens + decodes)

    def last_step_summary(self) -> str:
        """What the latest step ran and where its time went, for slow-step logs."""
        return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in self._last_step.items())

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_blocked=self.scheduler.num_blocked if self.scheduler.waiting else 0,
            num_blocks_free=bm.num_free_blocks, num_blocks_usable=bm.num_usable_blocks,
            num_blocks_lent=bm.num_lent_blocks, num_preemptions=self._num_preemptions,
            tokens_per_s=self._tokens_per_s(), **self._work,
        )

    def _append(self, seq: Sequence, token: SampledToken) -> RequestOutput:
        seq.output_token_ids.append(token.token_id)
        if seq.params.logprobs is not None:
            seq.output_logprobs.append(token)
        text, hit_stop = self._text[seq.request_id].add(token.token_id)
        reason = self._finish_reason(seq, token.token_id, hit_stop)
        logprobs = [token] if seq.params.logprobs is not None else []
        if reason is None:
            return RequestOutput(seq.request_id, [token.token_id], text, logprobs,
                                 num_prompt_tokens=len(seq.prompt_token_ids),
                                 num_output_tokens=len(seq.output_token_ids))
        self.scheduler.finish(seq, reason)
        return self._final(seq, [token.token_id], text, logprobs)

    def _finish_reason(self, seq: Sequence, token_id: int, hit_stop: bool) -> FinishReason | None:
        params = seq.params
        if hit_stop or token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    def _final(self, seq: Sequence, token_ids: list[int], text: str,
               logprobs: list[SampledToken] | None = None) -> RequestOutput:
        state = self._text.pop(seq.request_id)
        self._seqs.pop(seq.request_id, None)
        self._prior_output.pop(seq.request_id, None)
        self._work["finished"] += 1
        if not state.stopped:
            text += state.flush()
        return RequestOutput(
            seq.request_id, token_ids, text, logprobs or [], True, seq.finish_reason,
            len(seq.prompt_token_ids), len(seq.output_token_ids),
        )

    def _count_tokens(self, n: int) -> None:
        now = self._clock()
        self._token_times.append((now, n))
        while self._token_times and self._token_times[0][0] < now - 10.0:
            self._token_times.pop(0)

    def _tokens_per_s(self) -> float:
        if len(self._token_times) < 2:
            return 0.0
        span = self._token_times[-1][0] - self._token_times[0][0]
        return sum(n for _, n in self._token_times[1:]) / span if span > 0 else 0.0


def create_engine(checkpoint: Path, config: EngineConfig, dtype: str, device: str,
                  max_context: int, provider: TensorProvider | None = None,
                  kv_cache_bytes: int | None = None, seed: int = 0,
                  model: torch.nn.Module | None = None, tokenizer: Tokenizer | None = None,
                  runner: ModelRunner | None = None, tp: TensorParallel | None = None
                  ) -> LLMEngine:
    """Load a checkpoint directory into a ready engine on `device`.

    A worker passes `model` (built over a prewarmed slot when the prewarm finished) and
    `tokenizer` to turn a prewarmed replica into an engine without building anything again;
    from the second activation on it passes the `runner` too: the slot's addresses never move,
    so the runner's KV view and CUDA graphs stay valid across deactivations. With `tp` this
    is the driver of a tensor-parallel instance, whose other ranks `follow` (engine/parallel.py).
    """
    if runner is None:
        runner = create_runner(checkpoint, config, dtype, device, max_context, provider,
                               kv_cache_bytes, seed, model, tp)
    arch = runner.model.arch
    tokenizer = tokenizer or Tokenizer(checkpoint, arch)
    context = min(max_context, arch.max_position)
    scheduler = Scheduler(BlockManager(runner.scratch_block, config.block_size_tokens),
                          config.max_num_seqs, config.max_tokens_per_step)
    return LLMEngine(runner, scheduler, tokenizer, context)


def create_runner(checkpoint: Path, config: EngineConfig, dtype: str, device: str,
                  max_context: int, provider: TensorProvider | None = None,
                  kv_cache_bytes: int | None = None, seed: int = 0,
                  model: torch.nn.Module | None = None, tp: TensorParallel | None = None
                  ) -> ModelRunner:
    """The model and its KV cache on `device`, ready to run steps. With `tp`, this rank's
    shard (`model`, where given, must be that shard), its row-parallel layers summing over
    the instance: its KV cache holds its share of the KV heads in as many blocks as every
    rank can hold (`kv_cache_bytes` is this device's budget), so a block id means the same
    on all."""
    provider = provider or TorchProvider(device)
    torch_dtype = DTYPES[dtype]
    shard = tp.shard if tp is not None else Shard()
    if model is None:
        model = build_model(read_arch(checkpoint), checkpoint, torch_dtype, provider, shard)
    connect(model, tp)
    arch = model.arch
    kv_heads = arch.num_kv_heads // shard.size
    block_bytes = (config.block_size_tokens * arch.kv_bytes_per_token * torch_dtype.itemsize
                   // shard.size)
    num_blocks = _num_kv_blocks(config, kv_cache_bytes, block_bytes, provider.device)
    if tp is not None:
        num_blocks = tp.agree_min(num_blocks)
    max_blocks_per_seq = -(-max_context // config.block_size_tokens)
    if num_blocks < max_blocks_per_seq:
        log.warning("KV cache holds %d blocks, fewer than one full context (%d)", num_blocks,
                    max_blocks_per_seq)
    block_shape = (arch.num_layers, 2, config.block_size_tokens, kv_heads, arch.head_dim)
    kv_cache = provider.kv_cache(num_blocks + 1, block_shape, torch_dtype)  # +1: scratch
    return ModelRunner(
        model, kv_cache, config.block_size_tokens, max_blocks_per_seq, scratch_block=num_blocks,
        use_cuda_graphs=config.use_cuda_graphs,
        max_graph_batch=min(config.max_cuda_graph_batch, config.max_num_seqs), seed=seed, tp=tp,
    )


def _num_kv_blocks(config: EngineConfig, kv_cache_bytes: int | None, block_bytes: int,
                   device: torch.device) -> int:
    if kv_cache_bytes is None and config.kv_cache_gib is not None:
        kv_cache_bytes = int(config.kv_cache_gib * (1 << 30))
    if kv_cache_bytes is None:
        if device.type != "cuda":
            raise ValueError("engine.kv_cache_gib must be set for a CPU engine")
        free, _ = torch.cuda.mem_get_info(device)
        kv_cache_bytes = int(free * 0.85)
    return max(1, kv_cache_bytes // block_bytes - 1)


__all__ = ["EngineStats", "LLMEngine", "ModelArch", "RequestOutput", "create_engine",
           "create_runner"]
