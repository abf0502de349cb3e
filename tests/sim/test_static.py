"""Start-up placements: MuxServe's meshes and the dedicated system's growth; a model's costs
over more GPUs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.sim.profiles import load_profile
from warmserve.sim.state import Cluster, Instance
from warmserve.sim.static import (
    COLOCATED_WEIGHT_SHARE,
    PlannedModel,
    free_group,
    grow_cluster,
    mesh_throughput,
    node_splits,
    plan_muxserve,
)

PROFILE = load_profile("h100")
SHAPES = ("llama-2-7b", "llama-2-7b", "llama-2-13b", "llama-2-70b")


def _planned(rates: list[float], shapes=SHAPES) -> list[PlannedModel]:
    return [PlannedModel(i, PROFILE.model(s), r, 700.0, 200.0)
            for i, (s, r) in enumerate(zip(shapes, rates, strict=True))]


def _check_plan(plan, models: list[PlannedModel], cluster: Cluster) -> dict[int, tuple]:
    """The invariants of any MuxServe plan; returns each model's mesh."""
    meshes = {m: mesh for m, mesh, _ in plan}
    assert sorted(m for m, _, _ in plan) == sorted(meshes)  # one unit per model, never two
    per_gpu = cluster.gpus_per_node
    for m, mesh, cost in plan:
        assert cost.tp == len(mesh) >= models[m].cost.tp  # tensor parallel over the whole mesh
        assert mesh == tuple(range(mesh[0], mesh[0] + len(mesh)))
        assert mesh[0] % len(mesh) == 0 and mesh[0] // per_gpu == mesh[-1] // per_gpu
    distinct = set(meshes.values())
    used = [g for mesh in distinct for g in mesh]
    assert len(used) == len(set(used))  # meshes don't overlap
    for mesh in distinct:  # the weights of a mesh's models fit beside a KV pool
        weights = sum(cost.weight_bytes_per_gpu for _, g, cost in plan if g == mesh)
        assert weights <= COLOCATED_WEIGHT_SHARE * PROFILE.pool_bytes
    return meshes


def test_node_splits_are_aligned_power_of_two_meshes():
    splits = node_splits(8)
    assert len(splits) == 10 and (8,) in splits and (1,) * 8 in splits and (4, 2, 1, 1) in splits
    for split in splits + node_splits(6):
        assert list(split) == sorted(split, reverse=True)
        assert all(size & (size - 1) == 0 for size in split)
    assert {sum(s) for s in node_splits(6)} == {6}


def test_the_paper_cluster_gives_every_model_one_unit():
    cluster = Cluster(16, 8, PROFILE.pool_bytes)
    models = _planned([33.0, 25.0, 12.6, 10.0])
    meshes = _check_plan(plan_muxserve(cluster, models, 256), models, cluster)
    assert set(meshes) == {0, 1, 2, 3}
    assert len(meshes[3]) >= 4  # the 70B needs four GPUs at least


def test_models_share_meshes_when_they_outnumber_the_gpus():
    cluster = Cluster(8, 8, PROFILE.pool_bytes)
    models = _planned([40.0] + [1.0] * 11, ("llama-2-7b",) * 12)
    meshes = _check_plan(plan_muxserve(cluster, models, 256), models, cluster)
    assert len(meshes) == 12
    sharing = [mesh for mesh in set(meshes.values())
               if sum(1 for m in meshes.values() if m == mesh) > 1]
    assert sharing  # co-location: twelve 7B models on eight GPUs
    hot = meshes[0]
    tpt = mesh_throughput(tuple(m for m in models if meshes[m.index] == hot), len(hot),
                          PROFILE.pool_bytes, 256)
    assert tpt[0] >= 40.0  # the popular model's unit can carry its average rate


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.1, 60.0), min_size=1, max_size=10), st.sampled_from([8, 16, 24]))
def test_any_plan_keeps_the_invariants(rates, gpus):
    cluster = Cluster(gpus, 8, PROFILE.pool_bytes)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(len(rates))]
    models = _planned(rates, shapes)
    _check_plan(plan_muxserve(cluster, models, 256), models, cluster)


def test_mesh_throughput_falls_with_company_and_refuses_what_does_not_fit():
    seven, seventy = _planned([20.0, 20.0, 5.0, 5.0])[0], _planned([20.0, 20.0, 5.0, 5.0])[3]
    assert mesh_throughput((seventy,), 1, PROFILE.pool_bytes, 256) is None  # 138 GB on one GPU
    alone = mesh_throughput((seven,), 4, PROFILE.pool_bytes, 256)[0]
    shared = mesh_throughput((seven, seventy), 4, PROFILE.pool_bytes, 256)[0]
    assert 0 < shared < alone


def test_costs_over_more_gpus_shrink_but_less_than_linearly():
    cost = PROFILE.model("llama-2-7b")
    assert cost.on_gpus(cost.tp) is cost
    wide = cost.on_gpus(8)
    assert wide.tp == 8 and wide.weight_bytes == cost.weight_bytes
    assert wide.weight_bytes_per_gpu == cost.weight_bytes // 8
    for step, base in ((wide.decode_step_s(1), cost.decode_step_s(1)),
                       (wide.decode_step_s(256), cost.decode_step_s(256)),
                       (wide.prefill_s(1000), cost.prefill_s(1000))):
        assert base / 8 < step < base
    with pytest.raises(ValueError, match=r"llama-2-7b.*>= 1"):
        cost.on_gpus(0)


def test_growing_the_cluster_for_the_dedicated_system():
    cluster = Cluster(8, 8, PROFILE.pool_bytes)
    assert free_group(cluster, 4) == (0, 1, 2, 3)
    cluster.gpus[0].instances.append(object())
    cluster.gpus[4].instances.append(object())
    assert free_group(cluster, 4) is None
    assert grow_cluster(cluster, 4, PROFILE.pool_bytes) == (8, 9, 10, 11)
    assert len(cluster.gpus) == 16  # a whole node was added


def test_a_partial_last_node_has_only_the_groups_it_holds():
    cluster = Cluster(12, 8, PROFILE.pool_bytes)
    assert cluster.groups(4) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    assert (8, 9, 10, 11, 12, 13, 14, 15) not in cluster.groups(8)
    meshes = {mesh for _, mesh, _ in plan_muxserve(cluster, _planned([5.0] * 4), 256)}
    assert all(g < 12 for mesh in meshes for g in mesh)


def test_free_groups_follow_instances_placed_and_removed():
    cluster = Cluster(12, 8, PROFILE.pool_bytes)  # a full node and a half one
    cost = PROFILE.model("llama-2-13b")
    inst = Instance(0, 0, (2, 3), cost, created_at=0.0, ready_at=0.0, max_batch=32)
    cluster.place_instance(inst)
    assert cluster.free_groups(4) == [(4, 5, 6, 7), (8, 9, 10, 11)]
    assert cluster.free_groups(8) == []  # node 0 is busy, node 1 holds no group of 8
    assert (2, 3) not in cluster.free_groups(2)
    cluster.remove_instance(inst)
    assert cluster.free_groups(8) == [(0, 1, 2, 3, 4, 5, 6, 7)]
    assert cluster.free_groups(2) == list(cluster.groups(2))
