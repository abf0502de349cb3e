"""Summaries of a run: the same keys for simulated and live runs."""

from __future__ import annotations

import numpy as np

from warmserve.sim.simulator import SimResult


def summarize(result: SimResult, ttft_slo_s: float) -> dict:
    served = ~result.dropped
    ttft = result.ttft_s[served]
    tpot = result.tpot_s[served]

    def pct(q: float) -> float | None:
        return float(np.percentile(ttft, q)) if len(ttft) else None

    total = len(result.ttft_s)
    return {
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
        "ttft_p50_s": pct(50), "ttft_p90_s": pct(90), "ttft_p95_s": pct(95),
        "ttft_p99_s": pct(99),
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
        "completed": int(served.sum()),
        "dropped": int(result.dropped.sum()),
        "throughput_rps": float(served.sum() / result.duration_s),
        "slo_attainment": float((ttft <= ttft_slo_s).sum() / total) if total else None,
        "requests_within_slo": int((ttft <= ttft_slo_s).sum()),
        "ttft_slo_s": ttft_slo_s,
        "gpu_seconds_busy": float(result.gpu_seconds_busy),
        "gpus_used": result.gpus_used,
        "cold_starts": result.cold_starts,
        "prewarm_hits": result.prewarm_hits,
        "keep_alive_hits": result.keep_alive_hits,
        "kv_reclaims": result.kv_reclaims,
    } | ({"models": _per_model(result, ttft_slo_s)} if result.models else {}) | _hand_overs(result)


def _hand_overs(result: SimResult) -> dict:
    """Where drains hand running requests over: how many, and the P99 of their stall (from
    the hand-over to their next token on the new instance)."""
    stalls = result.handover_stall_s
    if stalls is None:
        return {}
    return {"handed_over": len(stalls),
            "handover_stall_p99_s": float(np.percentile(stalls, 99)) if len(stalls) else None}


def _per_model(result: SimResult, ttft_slo_s: float) -> dict[str, dict]:
    """Each model's share: its requests, those within the SLO, dropped, its P99 TTFT and the
    GPU-seconds its instances held (co-located instances each count their GPUs)."""
    out = {}
    for index, name in enumerate(result.models):
        mine = result.model_index == index
        ttft = result.ttft_s[mine & ~result.dropped]
        out[name] = {
            "requests": int(mine.sum()),
            "requests_within_slo": int((ttft <= ttft_slo_s).sum()),
            "dropped": int((mine & result.dropped).sum()),
            "ttft_p99_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
            "gpu_seconds": float(result.gpu_seconds_by_model[index]),
        }
    return out
