"""The systems compared, each a policy set on the same simulator.

- warmserve: forecast-driven prewarming on idle GPUs and lent KV memory, evict-aware placement,
  activation of prewarmed replicas (no copy), cold loads from the pinned host cache otherwise.
- serverlessllm: reactive autoscaling; loads from a per-node DRAM cache (LRU) or SSD into an
  engine started on demand; locality-aware placement; keep-alive of idle instances. Its router
  gives an instance a bounded number of requests and queues the rest (ServerlessLLM's
  RoundRobinRouter: 10 per instance in its code; we allow B = 32, as WarmServe's router).
  `serverlessllm-overflow` gives it our overflow routing too.
- muxserve: as published, static: each model one unit on one mesh of GPUs (tensor parallel over
  the mesh), meshes and co-location planned from average rates; one KV pool per mesh; compute
  slows down when co-located models run together (sim/static.py).
- dedicated: every model on enough GPUs for its peak, from the start (the ideal TTFT and the cost
  ceiling; may use more GPUs than the cluster has).
Beyond the paper, WarmServe here also rebalances (a model with requests waiting and no free GPU
group gets one by draining other models' surplus instances, each judged on its model's peak
load of the last rebalance_reserve_s) and overflows (the published router gives an instance at
most B requests and queues the rest for new instances; ours then fills instances up to the
engine's bound first). Its load signal counts prefill work as well as concurrency (a model
whose prompts outrun its instances' prefills is starving, whatever its queue), and when the
cluster cannot carry every model's load, rebalancing gives GPUs to the models whose requests
cost the fewest GPU-seconds first (policies.gpu_entitlement); `warmserve-goodput` judges
those needs from the work arriving rather than from concurrency. `warmserve-published` is the
published algorithm alone, its forecaster included. An instance that rebalancing drains hands
its running requests to its model's other instances instead of finishing them before its GPUs
change hands (live, the router resumes each on another instance after the tokens it has
sent). Ablations of warmserve: each of those off, surplus judged on the latest load only, no
prewarming at all, no forecast (prewarm for the last window's load), no KV reservation
(prewarm on free GPUs only), round-robin placement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SystemSpec:
    name: str
    autoscale: bool = True  # reactive autoscaler on
    prewarm: bool = False  # WarmServe prewarming
    forecast: bool = True  # prewarm from forecasts (else from the last window)
    # our forecaster extensions (blend with the last window, robust peak); off: the published
    forecast_extensions: bool = True
    kv_lending: bool = False  # prewarms may live in running instances' free KV memory
    round_robin: bool = False  # placement ablation
    engine_init: bool = False  # a cold start also starts an engine process
    keep_alive: bool = False  # idle instances stay loaded for a while
    deactivate_to_prewarm: bool = False  # a released instance's weights stay prewarmed
    rebalance: bool = False  # drain other models' surplus instances for a starving model
    overflow: bool = False  # the router fills instances past B, to the engine's bound
    colocate: bool = False  # MuxServe static co-location
    dedicated: bool = False  # peak-provisioned, unbounded GPUs
    # rebalancing counts other models' surplus against their peak 5-s load over the last
    # rebalance_reserve_s, not the latest one
    rebalance_lookback: bool = False
    # the load signal counts prefill work as well as concurrency: an instance whose prefills
    # take all its time is as full as one holding B requests
    prefill_aware: bool = False
    # when the cluster cannot carry every model's load, rebalancing follows policies.gpu_entitlement
    overload_control: bool = False
    # overload control judges a model's need from the work arriving (its peak arrival rate of
    # the look-back times its cost per request), not from its concurrency, which counts its
    # backlog (policies.demand_from_arrivals)
    need_from_arrivals: bool = False
    # an instance that rebalancing drains hands its running requests back to its model's queue
    # at once, to go on from the tokens they sent on the model's other instances, instead of
    # finishing them before its GPUs change hands
    hand_over_on_drain: bool = False
    description: str = ""


_WARMSERVE = dict(prewarm=True, kv_lending=True, deactivate_to_prewarm=True, rebalance=True,
                  rebalance_lookback=True, overflow=True, prefill_aware=True,
                  overload_control=True, hand_over_on_drain=True)
SYSTEMS: dict[str, SystemSpec] = {
    s.name: s for s in (
        SystemSpec("warmserve", **_WARMSERVE, description="forecast, evict-aware prewarming, "
                   "KV lending, GPU rebalancing with hand-over, overflow routing (all "
                   "techniques)"),
        SystemSpec("warmserve-published", **_WARMSERVE | dict(
                   rebalance=False, overflow=False, prefill_aware=False, overload_control=False,
                   hand_over_on_drain=False, forecast_extensions=False),
                   description="ablation: the published algorithm alone (its forecaster, no "
                   "rebalancing; the router queues past B requests per instance)"),
        SystemSpec("warmserve-no-rebalance", **_WARMSERVE | dict(rebalance=False),
                   description="ablation: no GPU rebalancing"),
        SystemSpec("warmserve-no-overflow", **_WARMSERVE | dict(overflow=False),
                   description="ablation: the published router (queues past B per instance)"),
        SystemSpec("warmserve-no-prewarm", **_WARMSERVE | dict(
                   prewarm=False, kv_lending=False, deactivate_to_prewarm=False),
                   description="ablation: no prewarming at all (every scale-up loads the "
                   "weights from the host cache into the universal worker)"),
        SystemSpec("warmserve-no-forecast", **_WARMSERVE | dict(forecast=False),
                   description="ablation: prewarm for the last window's load"),
        SystemSpec("warmserve-no-kv-reservation", **_WARMSERVE | dict(kv_lending=False),
                   description="ablation: prewarm on free GPUs only"),
        SystemSpec("warmserve-round-robin", **_WARMSERVE | dict(round_robin=True),
                   description="ablation: round-robin placement"),
        SystemSpec("warmserve-no-lookback", **_WARMSERVE | dict(rebalance_lookback=False),
                   description="ablation: rebalancing judges other models' surplus on their "
                   "latest load, not their peak of the last rebalance_reserve_s"),
        SystemSpec("warmserve-no-prefill-signal", **_WARMSERVE | dict(prefill_aware=False),
                   description="ablation: the load signal is concurrency alone (a model "
                   "whose prompts outrun its prefills looks no busier than its requests)"),
        SystemSpec("warmserve-no-handover", **_WARMSERVE | dict(hand_over_on_drain=False),
                   description="ablation: an instance drained for rebalancing finishes its "
                   "running requests before its GPUs change hands"),
        SystemSpec("warmserve-no-overload-control", **_WARMSERVE | dict(overload_control=False),
                   description="ablation: rebalancing serves any starving model, whatever "
                   "its requests cost, when the cluster cannot carry every model's load"),
        SystemSpec("warmserve-goodput", **_WARMSERVE, need_from_arrivals=True,
                   description="warmserve whose overload control judges needs from arriving "
                   "work rather than from concurrency, which counts a model's backlog"),
        SystemSpec("serverlessllm", engine_init=True, keep_alive=True,
                   description="reactive autoscaling, DRAM/SSD loading, keep-alive"),
        SystemSpec("serverlessllm-overflow", engine_init=True, keep_alive=True, overflow=True,
                   description="serverlessllm with WarmServe's overflow routing (beyond its "
                   "paper: a stronger baseline)"),
        SystemSpec("muxserve", autoscale=False, colocate=True,
                   description="static co-location planned from average rates: one "
                   "tensor-parallel unit per model on GPU meshes"),
        SystemSpec("dedicated", autoscale=False, dedicated=True,
                   description="each model provisioned for its peak (ideal, unbounded GPUs)"),
    )
}
DEFAULT_SYSTEMS = ("warmserve", "serverlessllm", "muxserve", "dedicated")
VARIANTS = ("serverlessllm-overflow",  # a baseline made stronger than published
            "warmserve-goodput")  # warmserve with another trade under overload
ABLATIONS = ("warmserve-published", "warmserve-no-rebalance", "warmserve-no-handover",
             "warmserve-no-lookback",
             "warmserve-no-prefill-signal", "warmserve-no-overload-control",
             "warmserve-no-overflow", "warmserve-no-prewarm", "warmserve-no-forecast",
             "warmserve-no-kv-reservation", "warmserve-round-robin")


# the policy sets the live controller runs (`warmserve serve --policy`); of the ablations only
# the hand-over's (the drained instance finishes its requests first), the rest are the
# simulator's
LIVE = ("warmserve", "warmserve-goodput", "warmserve-no-handover", "serverlessllm", "muxserve",
        "dedicated")


def get_live_system(name: str) -> SystemSpec:
    if name not in LIVE:
        raise ValueError(f"--policy {name!r}: the live system runs {', '.join(LIVE)}"
                         + (" (this one is simulated only)" if name in SYSTEMS else ""))
    return SYSTEMS[name]


def get_system(name: str) -> SystemSpec:
    if name not in SYSTEMS:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
