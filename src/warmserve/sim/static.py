"""Placements made once, at start: MuxServe's co-location and the dedicated system's peak
provisioning (which grows the cluster as far as it must)."""

from __future__ import annotations

from collections.abc import Sequence

from warmserve.sim.state import Cluster, ModelState

COLOCATED_WEIGHT_SHARE = 0.75  # of a GPU's pool; the rest is the shared KV cache


def free_group(cluster: Cluster, tp: int) -> tuple[int, ...] | None:
    """The first aligned group of `tp` GPUs without instances."""
    return next((grp for grp in cluster.groups(tp)
                 if all(cluster.gpus[g].is_free for g in grp)), None)


def grow_cluster(cluster: Cluster, tp: int, pool_bytes: int) -> tuple[int, ...]:
    """A free aligned group, adding a node's worth of GPUs until there is one."""
    group = free_group(cluster, tp)
    while group is None:
        per_node, used = cluster.gpus_per_node, len(cluster.gpus)
        cluster.add_gpus(per_node - used % per_node if used % per_node else per_node,
                         pool_bytes)
        group = free_group(cluster, tp)
    return group


def plan_colocation(cluster: Cluster, models: Sequence[ModelState], shares: Sequence[float]
                    ) -> list[tuple[int, tuple[int, ...]]]:
    """MuxServe-style: all models co-located, planned from average rates. Replicas go, one at
    a time, to the model with the most compute demand (rate share x parameters) per replica,
    on the group with the least weight memory planned, while each GPU keeps a quarter of its
    pool for the shared KV cache; until no replica fits. Returns (model, group) in order."""
    demand = {s.index: shares[s.index] * s.cost.weight_bytes for s in models}
    replicas = dict.fromkeys(demand, 0)
    weights = {g.id: g.used_bytes() for g in cluster.gpus}
    holds: dict[int, set[int]] = {g.id: {i.model for i in g.instances} for g in cluster.gpus}
    plan = []
    open_models = set(demand)
    while open_models:
        m = max(open_models, key=lambda i: (demand[i] / (replicas[i] + 1), -i))
        per_gpu = models[m].cost.weight_bytes_per_gpu
        groups = [grp for grp in cluster.groups(models[m].cost.tp)
                  if all(weights[g] + per_gpu
                         <= COLOCATED_WEIGHT_SHARE * cluster.gpus[g].pool_bytes
                         and m not in holds[g] for g in grp)]
        if not groups:
            open_models.discard(m)
            continue
        group = min(groups, key=lambda grp: (sum(weights[g] for g in grp), grp))
        for g in group:
            weights[g] += per_gpu
            holds[g].add(m)
        plan.append((m, group))
        replicas[m] += 1
    return plan
