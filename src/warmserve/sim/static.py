"""Placements made once, at start: MuxServe's co-location and the dedicated system's peak
provisioning (which grows the cluster as far as it must).

MuxServe as published (Duan et al., ICML'24, and its placement code): each node is split into
meshes of 1, 2, 4 or 8 GPUs; every model gets exactly one unit on one mesh, with tensor
parallelism over the whole mesh; the models of a mesh share its memory (weights, then one KV
pool split by rate x KV bytes per token) and its compute (a prefill of any of them holds the
mesh; decodes run side by side under MPS). The placement tries every split of the nodes, puts
the models, the most compute-hungry first, where they add the most estimated throughput, and
keeps the split that serves the most of the average rates, then leaves the most headroom.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from warmserve.sim.profiles import ModelCost
from warmserve.sim.state import Cluster

COLOCATED_WEIGHT_SHARE = 0.75  # of a GPU's pool; the rest is the shared KV cache
COLOCATION_SLOWDOWN = 0.75  # per other co-located model running: MPS overlaps kernels, so a
#                             step slows by less than pure time-sharing (1.0) would
MAX_HEADROOM = 100.0  # throughput / rate beyond this adds nothing to a layout's score
MAX_SPLITS = 2000  # beyond this many node-split combinations, every node is split alike


@dataclass(frozen=True)
class PlannedModel:
    """What MuxServe's placement knows of a model: its average load."""
    index: int
    cost: ModelCost  # as profiled, at its smallest tensor-parallel degree
    rate_rps: float
    prompt_tokens: float  # means
    output_tokens: float


def node_splits(gpus: int) -> list[tuple[int, ...]]:
    """Every split of a node's GPUs into meshes of power-of-two sizes, largest first (so that
    each mesh is an aligned group)."""
    def splits(left: int, largest: int) -> list[tuple[int, ...]]:
        if left == 0:
            return [()]
        out = []
        size = largest
        while size >= 1:
            if size <= left:
                out += [(size, *rest) for rest in splits(left - size, size)]
            size //= 2
        return out
    top = 1
    while top * 2 <= gpus:
        top *= 2
    return splits(gpus, top)


def mesh_throughput(models: tuple[PlannedModel, ...], size: int, pool_bytes: int,
                    max_batch: int) -> dict[int, float] | None:
    """Requests/s each model can sustain on one mesh of `size` GPUs holding all of `models`
    (MuxServe's estimate: the batch its KV share allows, a prefill of every co-located model
    per round, decode steps slowed by the others); None if the weights don't fit."""
    costs = [m.cost.on_gpus(size) for m in models]
    weights = sum(c.weight_bytes_per_gpu for c in costs)
    if weights > COLOCATED_WEIGHT_SHARE * pool_bytes:
        return None
    kv_pool = (pool_bytes - weights) * size
    demand = [m.rate_rps * c.kv_bytes_per_token for m, c in zip(models, costs, strict=True)]
    prefills = sum(c.prefill_s(int(m.prompt_tokens)) for m, c in zip(models, costs, strict=True))
    slowdown = 1.0 + COLOCATION_SLOWDOWN * (len(models) - 1)
    out = {}
    for m, c, d in zip(models, costs, demand, strict=True):
        share = kv_pool * (d / sum(demand) if sum(demand) else 1.0 / len(models))
        batch = min(max_batch,
                    int(share / c.kv_bytes_per_token / max(1.0, m.prompt_tokens + m.output_tokens)))
        if batch < 1:
            out[m.index] = 0.0
            continue
        step = c.batch_step_s(batch, m.prompt_tokens, m.output_tokens)
        out[m.index] = batch / (prefills + m.output_tokens * step * slowdown)
    return out


def plan_muxserve(cluster: Cluster, models: Sequence[PlannedModel], max_batch: int
                  ) -> list[tuple[int, tuple[int, ...], ModelCost]]:
    """MuxServe's placement (see the module note): (model, mesh, cost at the mesh's size) for
    each model placed. A model that fits nowhere is left out (its requests wait, then drop)."""
    per_node = cluster.gpus_per_node
    options = node_splits(per_node)
    if math.comb(len(options) + cluster.num_nodes - 1, cluster.num_nodes) <= MAX_SPLITS:
        layouts = itertools.combinations_with_replacement(options, cluster.num_nodes)
    else:
        layouts = ((split,) * cluster.num_nodes for split in options)
    pool = cluster.gpus[0].pool_bytes

    @cache
    def throughput(held: tuple[PlannedModel, ...], size: int) -> dict[int, float] | None:
        return mesh_throughput(held, size, pool, max_batch)

    order = sorted(models, key=lambda m: (-m.rate_rps * m.cost.weight_bytes, m.index))
    best, best_score = [], None
    for layout in layouts:
        meshes = []
        for node, split in enumerate(layout):
            for start, size in zip(itertools.accumulate((0, *split)), split, strict=False):
                first = node * per_node + start
                if first + size <= len(cluster.gpus):  # a last node may be partial
                    meshes.append(tuple(range(first, first + size)))
        plan, score = _greedy(order, meshes, throughput)
        if best_score is None or score > best_score:
            best, best_score = plan, score
    return best


def _greedy(order: Sequence[PlannedModel], meshes: list[tuple[int, ...]], throughput
            ) -> tuple[list[tuple[int, tuple[int, ...], ModelCost]], tuple]:
    """Each model, in order, onto the mesh where it adds the most served rate (on a tie, the
    smaller mesh, then the one with the least compute demand per GPU so far). Scored by models
    placed, rate served, then the headroom left for bursts (the sum of log(throughput / rate):
    every model's spare capacity counts)."""
    held: list[tuple[PlannedModel, ...]] = [() for _ in meshes]
    served = [0.0] * len(meshes)
    load = [0.0] * len(meshes)  # compute demand per GPU (rate x parameters / GPUs)
    for model in order:
        choice, best_key, best_served = None, None, 0.0
        for k, mesh in enumerate(meshes):
            if len(mesh) < model.cost.tp:
                continue
            tpt = throughput((*held[k], model), len(mesh))
            if tpt is None:
                continue
            now = sum(min(m.rate_rps, tpt[m.index]) for m in (*held[k], model))
            key = (round(now - served[k], 9), -len(mesh), -load[k])
            if best_key is None or key > best_key:
                choice, best_key, best_served = k, key, now
        if choice is not None:
            held[choice] += (model,)
            served[choice] = best_served
            load[choice] += model.rate_rps * model.cost.weight_bytes / len(meshes[choice])
    plan, headroom = [], 0.0
    for k, mesh in enumerate(meshes):
        if not held[k]:
            continue
        tpt = throughput(held[k], len(mesh))
        for m in held[k]:
            plan.append((m.index, mesh, m.cost.on_gpus(len(mesh))))
            headroom += math.log(min(MAX_HEADROOM, max(tpt[m.index], 1e-9)
                                     / max(m.rate_rps, 1e-9)))
    return plan, (len(plan), round(sum(served), 6), headroom)


def free_group(cluster: Cluster, tp: int) -> tuple[int, ...] | None:
    """The first aligned group of `tp` GPUs without instances."""
    groups = cluster.free_groups(tp)
    return groups[0] if groups else None


def grow_cluster(cluster: Cluster, tp: int, pool_bytes: int) -> tuple[int, ...]:
    """A free aligned group, adding a node's worth of GPUs until there is one."""
    group = free_group(cluster, tp)
    while group is None:
        per_node, used = cluster.gpus_per_node, len(cluster.gpus)
        cluster.add_gpus(per_node - used % per_node if used % per_node else per_node,
                         pool_bytes)
        group = free_group(cluster, tp)
    return group
