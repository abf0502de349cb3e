"""Summaries of a run: the same keys for simulated and live runs."""

from __future__ import annotations

import numpy as np

from warmserve.sim.simulator import SimResult


def within_slo(result: SimResult, ttft_slo_s: float) -> np.ndarray:
    """Per request: served, its first token within the TTFT SLO, and, where it was handed
    over mid-stream, no wait for a next token longer than that SLO either."""
    ok = ~result.dropped & (np.nan_to_num(result.ttft_s, nan=np.inf) <= ttft_slo_s)
    if result.stall_s is not None:
        ok &= result.stall_s <= ttft_slo_s
    return ok


def summarize(result: SimResult, ttft_slo_s: float) -> dict:
    served = ~result.dropped
    ok = within_slo(result, ttft_slo_s)
    ttft = result.ttft_s[served]
    tpot = result.tpot_s[served]

    def pct(q: float) -> float | None:
        return float(np.percentile(ttft, q)) if len(ttft) else None

    total = len(result.ttft_s)
    summary = {
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
        "ttft_p50_s": pct(50), "ttft_p90_s": pct(90), "ttft_p95_s": pct(95),
        "ttft_p99_s": pct(99),
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
        "completed": int(served.sum()),
        "dropped": int(result.dropped.sum()),
        "throughput_rps": float(served.sum() / result.duration_s),
        "slo_attainment": float(ok.sum() / total) if total else None,
        "requests_within_slo": int(ok.sum()),
        "ttft_slo_s": ttft_slo_s,
        "gpu_seconds_busy": float(result.gpu_seconds_busy),
        "gpus_used": result.gpus_used,
        "cold_starts": result.cold_starts,
        "prewarm_hits": result.prewarm_hits,
        "keep_alive_hits": result.keep_alive_hits,
        "kv_reclaims": result.kv_reclaims,
    }
    if result.models:
        summary["models"] = _per_model(result, ok)
    return summary | _hand_overs(result, ttft_slo_s)


def _hand_overs(result: SimResult, ttft_slo_s: float) -> dict:
    """Where drains hand running requests over: how many hand-overs of requests past their
    first token (one not yet past it starts over, with no stall), the P99 of their stall
    (from the hand-over to their next token on the new instance), and how many requests a
    stall alone put outside the SLO (their first token within it, a stall not)."""
    stalls = result.handover_stall_s
    if stalls is None:
        return {}
    return {"handed_over": len(stalls),
            "handover_stall_p99_s": float(np.percentile(stalls, 99)) if len(stalls) else None,
            "stalled_past_slo": int((~result.dropped & (result.ttft_s <= ttft_slo_s)
                                     & (result.stall_s > ttft_slo_s)).sum())}


def _per_model(result: SimResult, ok: np.ndarray) -> dict[str, dict]:
    """Each model's share: its requests, those within the SLO, dropped, its P99 TTFT and the
    GPU-seconds its instances held (co-located instances each count their GPUs)."""
    out = {}
    for index, name in enumerate(result.models):
        mine = result.model_index == index
        ttft = result.ttft_s[mine & ~result.dropped]
        out[name] = {
            "requests": int(mine.sum()),
            "requests_within_slo": int((ok & mine).sum()),
            "dropped": int((mine & result.dropped).sum()),
            "ttft_p99_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
            "gpu_seconds": float(result.gpu_seconds_by_model[index]),
        }
    return out
