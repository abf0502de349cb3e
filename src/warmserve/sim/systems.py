"""The systems compared, each a policy set on the same simulator.

- warmserve: forecast-driven prewarming on idle GPUs and lent KV memory, evict-aware placement,
  activation of prewarmed replicas (no copy), cold loads from the pinned host cache otherwise.
- serverlessllm: reactive autoscaling; loads from a per-node DRAM cache (LRU) or SSD into an
  engine started on demand; locality-aware placement; keep-alive of idle instances.
- muxserve: static co-location of all models, planned from average rates; a shared KV pool per
  GPU; compute slows down when co-located models run together.
- dedicated: every model on enough GPUs for its peak, from the start (the ideal TTFT and the cost
  ceiling; may use more GPUs than the cluster has).
WarmServe here also rebalances: a model with requests waiting and no free GPU group gets one by
draining other models' surplus instances (beyond the paper; `warmserve-no-rebalance` is the
published algorithm alone). Ablations of warmserve: no rebalancing, no forecast (prewarm for
the last window's load), no KV reservation (prewarm on free GPUs only), round-robin placement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SystemSpec:
    name: str
    autoscale: bool = True  # reactive autoscaler on
    prewarm: bool = False  # WarmServe prewarming
    forecast: bool = True  # prewarm from forecasts (else from the last window)
    kv_lending: bool = False  # prewarms may live in running instances' free KV memory
    round_robin: bool = False  # placement ablation
    engine_init: bool = False  # a cold start also starts an engine process
    keep_alive: bool = False  # idle instances stay loaded for a while
    deactivate_to_prewarm: bool = False  # a released instance's weights stay prewarmed
    rebalance: bool = False  # drain other models' surplus instances for a starving model
    colocate: bool = False  # MuxServe static co-location
    dedicated: bool = False  # peak-provisioned, unbounded GPUs
    description: str = ""


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s for s in (
        SystemSpec("warmserve", prewarm=True, kv_lending=True, deactivate_to_prewarm=True,
                   rebalance=True, description="forecast, evict-aware prewarming, KV lending, "
                   "GPU rebalancing (all techniques)"),
        SystemSpec("warmserve-no-rebalance", prewarm=True, kv_lending=True,
                   deactivate_to_prewarm=True,
                   description="ablation: the published algorithm (no GPU rebalancing)"),
        SystemSpec("warmserve-no-forecast", prewarm=True, forecast=False, kv_lending=True,
                   deactivate_to_prewarm=True, rebalance=True,
                   description="ablation: prewarm for the last window's load"),
        SystemSpec("warmserve-no-kv-reservation", prewarm=True, kv_lending=False,
                   deactivate_to_prewarm=True, rebalance=True,
                   description="ablation: prewarm on free GPUs only"),
        SystemSpec("warmserve-round-robin", prewarm=True, kv_lending=True, round_robin=True,
                   deactivate_to_prewarm=True, rebalance=True,
                   description="ablation: round-robin placement"),
        SystemSpec("serverlessllm", engine_init=True, keep_alive=True,
                   description="reactive autoscaling, DRAM/SSD loading, keep-alive"),
        SystemSpec("muxserve", autoscale=False, colocate=True,
                   description="static co-location planned from average rates"),
        SystemSpec("dedicated", autoscale=False, dedicated=True,
                   description="each model provisioned for its peak (ideal, unbounded GPUs)"),
    )
}
DEFAULT_SYSTEMS = ("warmserve", "serverlessllm", "muxserve", "dedicated")
ABLATIONS = ("warmserve-no-rebalance", "warmserve-no-forecast", "warmserve-no-kv-reservation",
             "warmserve-round-robin")


def get_system(name: str) -> SystemSpec:
    if name not in SYSTEMS:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
