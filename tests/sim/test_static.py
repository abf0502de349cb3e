"""Start-up placements: MuxServe's co-location plan and the dedicated system's growth."""

from __future__ import annotations

from collections import Counter

from warmserve.control.predictor import ModelForecaster
from warmserve.sim.profiles import load_profile
from warmserve.sim.state import Cluster, ModelState
from warmserve.sim.static import (
    COLOCATED_WEIGHT_SHARE,
    free_group,
    grow_cluster,
    plan_colocation,
)

PROFILE = load_profile("h100")
SHAPES = ("llama-2-7b", "llama-2-7b", "llama-2-13b", "llama-2-70b")


def _models() -> list[ModelState]:
    return [ModelState(i, PROFILE.model(s), ModelForecaster(4)) for i, s in enumerate(SHAPES)]


def test_colocation_fits_every_model_within_the_weight_share():
    cluster = Cluster(16, 8, PROFILE.pool_bytes)
    models = _models()
    plan = plan_colocation(cluster, models, [0.48, 0.24, 0.16, 0.12])
    assert {m for m, _ in plan} == {0, 1, 2, 3}  # every model is resident somewhere
    weights, per_gpu_models = Counter(), Counter()
    for m, group in plan:
        cost = models[m].cost
        assert len(group) == cost.tp and group[0] % cost.tp == 0  # aligned
        for g in group:
            weights[g] += cost.weight_bytes_per_gpu
            per_gpu_models[(g, m)] += 1
    assert max(weights.values()) <= COLOCATED_WEIGHT_SHARE * PROFILE.pool_bytes
    assert max(per_gpu_models.values()) == 1  # never two replicas of a model on a GPU
    replicas = Counter(m for m, _ in plan)
    assert replicas[0] >= replicas[1]  # more demand, at least as many replicas


def test_growing_the_cluster_for_the_dedicated_system():
    cluster = Cluster(8, 8, PROFILE.pool_bytes)
    assert free_group(cluster, 4) == (0, 1, 2, 3)
    cluster.gpus[0].instances.append(object())
    cluster.gpus[4].instances.append(object())
    assert free_group(cluster, 4) is None
    assert grow_cluster(cluster, 4, PROFILE.pool_bytes) == (8, 9, 10, 11)
    assert len(cluster.gpus) == 16  # a whole node was added
