"""Open-loop replay of a workload against any OpenAI-compatible endpoint.

Each request is sent at its arrival time whatever happened to the others (open loop), streamed,
and timed: TTFT at the first content chunk, TPOT over the rest, and the longest wait between
two chunks. A request meets the SLO when its first chunk came within the TTFT SLO and no later
one kept it waiting longer than that (a request handed over mid-stream waits once more, as the
simulator counts it). The summary has the same keys as `warmserve simulate --json`, so a live
run and a simulated one compare line by line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np

from warmserve.workload.builder import Workload

# Prompts are token ids, so a request is exactly as long as the trace says whatever the model's
# tokenizer (text would be ~5x longer on a byte-level one). Ids 32..126 exist in every vocabulary
# of 128 or more entries (printable characters on a byte-level tokenizer).
_LOW_ID, _HIGH_ID = 32, 127


@dataclass
class Result:
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")
    longest_gap_s: float = 0.0  # between two chunks after the first
    tokens: int = 0
    ok: bool = False
    status: int | None = None
    error: str | None = None  # the server's message, where it answered with an error


def prompt_ids(tokens: int, seed: int) -> list[int]:
    """A prompt of exactly `tokens` (at least 1) token ids, different for each seed."""
    span = _HIGH_ID - _LOW_ID
    return [_LOW_ID + (seed * 7 + i * 13) % span for i in range(max(1, tokens))]


async def replay(url: str, workload: Workload, models: list[str], api_key: str | None = None,
                 max_input_tokens: int = 1024, max_output_tokens: int = 512,
                 timeout_s: float = 600.0, duration_s: float | None = None) -> list[Result]:
    """Send every request of `workload` (model i -> models[i % len(models)]) at its time."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    end = duration_s if duration_s is not None else float("inf")
    index = [i for i in range(workload.num_requests) if workload.arrival_s[i] < end]
    results = [Result() for _ in index]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s,
                                 limits=limits) as client:
        start = time.perf_counter()

        async def one(slot: int, i: int) -> None:
            await asyncio.sleep(max(0.0, workload.arrival_s[i] - (time.perf_counter() - start)))
            body = {"model": models[int(workload.model_index[i]) % len(models)],
                    "prompt": prompt_ids(min(int(workload.input_tokens[i]), max_input_tokens), i),
                    "max_tokens": min(int(workload.output_tokens[i]), max_output_tokens),
                    "temperature": 0, "stream": True, "ignore_eos": True}
            results[slot] = await _stream(client, body)

        await asyncio.gather(*(one(slot, i) for slot, i in enumerate(index)))
    return results


async def _stream(client: httpx.AsyncClient, body: dict) -> Result:
    result = Result()
    sent = time.perf_counter()
    times = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = _message(await response.aread())
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = _message(line[6:].encode())
                    return result
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if times:
        result.ok = True
        result.ttft_s = times[0] - sent
        result.tokens = len(times)
        if len(times) > 1:
            result.tpot_s = (times[-1] - times[0]) / (len(times) - 1)
            result.longest_gap_s = float(np.diff(times).max())
    return result


def _message(body: bytes) -> str:
    """An error body's message (OpenAI-style objects), else its first 200 characters."""
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def summarize_live(results: list[Result], duration_s: float, ttft_slo_s: float,
                   cluster: dict | None = None, cluster_before: dict | None = None) -> dict:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft_s for r in ok])
    gaps = np.array([r.longest_gap_s for r in ok])
    within = (ttft <= ttft_slo_s) & (gaps <= ttft_slo_s)
    tpot = np.array([r.tpot_s for r in ok if not np.isnan(r.tpot_s)])

    def pct(q: float) -> float | None:
        return float(np.percentile(ttft, q)) if len(ttft) else None

    cold = _delta(cluster, cluster_before, "cold_starts")
    hits = _delta(cluster, cluster_before, "prewarm_hits")
    return {
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
        "ttft_p50_s": pct(50), "ttft_p90_s": pct(90), "ttft_p95_s": pct(95), "ttft_p99_s": pct(99),
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
        "completed": len(ok), "dropped": len(results) - len(ok),
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else None,
        "slo_attainment": float(within.sum() / len(results)) if results else None,
        "requests_within_slo": int(within.sum()),
        "stalled_past_slo": int(((ttft <= ttft_slo_s) & (gaps > ttft_slo_s)).sum()),
        "ttft_slo_s": ttft_slo_s,
        "gpu_seconds_busy": None,  # not observable from outside the endpoint
        "cold_starts": cold,
        "prewarm_hits": hits,
        # every activation, by the router or the controller, either loaded weights or found
        # them prewarmed (the controller's action log holds only its own, and only the latest)
        "activations": None if cold is None or hits is None else cold + hits,
        "rejected_429": sum(1 for r in results if r.status == 429),
        # the commonest errors, with how many requests got each
        "errors": dict(Counter(r.error for r in results if r.error).most_common(5)),
    }


def _delta(after: dict | None, before: dict | None, key: str) -> int | None:
    """A WarmServe endpoint's counter over the run (None for other endpoints)."""
    if not after or key not in after:
        return None
    return after[key] - ((before or {}).get(key, 0))
