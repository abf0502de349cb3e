"""The capacity manager: scale-up sources, reservations, and WarmServe's rebalancing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from warmserve.config import PolicyConfig
from warmserve.control.policies import peak_recent_load
from warmserve.sim.metrics import summarize
from warmserve.sim.profiles import load_profile
from warmserve.sim.simulator import SimConfig, Simulator
from warmserve.sim.systems import SystemSpec, get_system
from warmserve.workload.builder import Workload, WorkloadSpec

PROFILE = load_profile("h100")


def two_model_sim(system: str | SystemSpec, num_gpus: int = 8, shapes: dict[str, str] | None = None
                  ) -> Simulator:
    """A 7B model ("s") and a 70B TP4 model ("big") on 8-GPU nodes (one unless `num_gpus`
    says more), or the models `shapes` names; no requests yet."""
    shapes = shapes or {"s": "llama-2-7b", "big": "llama-2-70b"}
    names = tuple(shapes)
    workload_spec = WorkloadSpec(names, total_rate_rps=1.0, duration_s=60.0, window_s=30.0,
                        shape="flat", history_periods=0)
    arrivals = np.array([10.0])
    workload = Workload(workload_spec, names, arrivals, np.array([1], np.int32),
                        np.array([100], np.int32), np.array([10], np.int32))
    costs = [PROFILE.model(shape) for shape in shapes.values()]
    spec = get_system(system) if isinstance(system, str) else system
    return Simulator(workload, costs, spec,
                     SimConfig(num_gpus, 8, PolicyConfig(), PROFILE))


def set_load(state, load: float) -> None:
    """A model's load as the autoscaler's tick leaves it: its latest 5-s mean, which is also
    its peak over the look-back (nothing earlier was recorded)."""
    state.load = state.peak_load = load


def _crowd(sim: Simulator, running: int) -> None:
    """Seven instances of "s" (one GPU each, GPU 7 free) with little load; "big" starving."""
    small, big = sim.models
    for g in range(7):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
        small.instances[-1].running = running
    sim.events.now = 100.0
    set_load(small, 60.0)  # needs ceil(60 / 25.6) = 3 instances: 4 are surplus
    big.queue.append(0)
    big.load = 40.0


def test_rebalancing_drains_surplus_instances_for_a_starving_model():
    sim = two_model_sim("warmserve")
    _crowd(sim, running=0)
    small, big = sim.models
    assert not sim.cap.acquire(big)  # no free group: drain one, then scale up when it empties
    # the group with the free GPU needs 3 drained instances, the other 4: it drains 4, 5, 6
    assert sorted(i.gpus[0] for i in small.instances) == [0, 1, 2, 3]
    assert [i.gpus for i in big.instances] == [(4, 5, 6, 7)]
    assert sim.cap.counts["rebalance"] == 1 and sim.cap.counts["cold"] == 1


def test_rebalancing_leaves_a_group_that_a_new_instance_keeps_busy():
    """An instance younger than its scale-down protection may not be drained or moved, so the
    group it sits on cannot be freed: rebalancing drains the other group, or none. (It once
    drained the rest of such a group and reserved it; the group never emptied, the reservation
    lapsed and was taken again, and the starving 70B waited minutes.)"""
    sim = two_model_sim("warmserve", num_gpus=8)
    _crowd(sim, running=0)
    small, big = sim.models
    young = next(i for i in small.instances if i.gpus == (5,))
    young.active_since = sim.now  # just scaled up
    assert not sim.cap.acquire(big)
    assert [i.gpus for i in big.instances] == [(0, 1, 2, 3)]
    assert young in small.instances and young.accepting
    sim2 = two_model_sim("warmserve", num_gpus=8)
    _crowd(sim2, running=0)
    for inst in sim2.models[0].instances:
        if inst.gpus[0] in (1, 5):
            inst.active_since = sim2.now
    assert not sim2.cap.acquire(sim2.models[1])
    assert sim2.cap.counts["rebalance"] == 0 and not sim2.cap.reserved
    assert len(sim2.models[0].live()) == 7  # nothing drained in vain


def _scattered(system: str) -> Simulator:
    """No free GPU: four 7Bs of "s" on 0..3 (two surplus), two 13Bs of "m" on 4..7 (one
    surplus), and "big" (a 70B) starving."""
    sim = two_model_sim(system, shapes={"s": "llama-2-7b", "m": "llama-2-13b",
                                        "big": "llama-2-70b"})
    small, mid, big = sim.models
    for g in range(4):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
    for group in ((4, 5), (6, 7)):
        sim.cap.new_instance(mid, group, ready_at=0.0)
    sim.events.now = 100.0
    set_load(small, 50.0)
    set_load(mid, 20.0)
    big.queue.append(0)
    big.load = 40.0
    return sim


def test_rebalancing_makes_room_for_a_move_with_surplus_elsewhere():
    """No aligned group that surplus alone frees. Rebalancing drains one 13B, and moves the
    other onto GPUs 0..1 after draining two 7Bs there (their requests handed over); once the
    moved 13B is up, its old instance drains and the 70B gets 4..7. (It once found no plan
    here, and the 70B waited a minute with 200 requests queued.)"""
    sim = _scattered("warmserve")
    small, mid, big = sim.models
    assert not sim.cap.acquire(big)
    assert sorted(i.gpus for i in small.instances) == [(2,), (3,)]
    moved = next(i for i in mid.instances if i.gpus == (0, 1))
    old = next(i for i in mid.instances if i.gpus == (6, 7))
    assert moved.ready_at > sim.now and old.accepting  # the old one serves until then
    assert all(sim.cap.reserved[g][0] == big.index for g in (4, 5, 6, 7))
    sim.events.now = moved.ready_at
    sim.cap.on_ready(moved)
    assert old not in mid.instances
    assert [i.gpus for i in big.instances] == [(4, 5, 6, 7)]
    assert not sim.cap.reserved
    # without a hand-over drained GPUs free only when their requests finish: no room is made
    no_room = _scattered("warmserve-no-handover")
    assert not no_room.cap.acquire(no_room.models[2])
    assert no_room.cap.counts["rebalance"] == 0


def test_a_group_being_drained_is_reserved_for_the_starving_model():
    """Without hand-over, drained instances hold their GPUs until their requests finish."""
    sim = two_model_sim("warmserve-no-handover")
    _crowd(sim, running=3)  # drained instances finish their requests first
    small, big = sim.models
    assert not sim.cap.acquire(big)
    draining = sorted(i.gpus[0] for i in small.instances if i.draining)
    assert draining == [4, 5, 6]
    assert sim.cap.cold_group(small) is None  # GPU 7 is free but reserved for "big"
    assert sim.cap.cold_group(big) is None  # not free yet
    for inst in [i for i in small.instances if i.draining]:
        inst.running = 0
        sim.cap.release(inst)
    assert [i.gpus for i in big.instances] == [(4, 5, 6, 7)]
    assert not sim.cap.reserved


def _handing_over(system: str, admitted_at: tuple[float, ...], prompt: int = 500
                  ) -> Simulator:
    """Seven 7B instances of "s" on GPUs 0..6 of one node, requests of "s" (`prompt` tokens
    in, 400 out) admitted on GPU 6's at `admitted_at`; at t = 10 "s" is over-provisioned
    and "big" (a 70B, TP4) starves, so rebalancing drains GPUs 4..6."""
    names = ("s", "big")
    n = len(admitted_at)  # and the last request, "big"'s
    spec = WorkloadSpec(names, total_rate_rps=1.0, duration_s=60.0, window_s=30.0,
                        shape="flat", history_periods=0)
    workload = Workload(spec, names, np.array([*admitted_at, 10.0]),
                        np.array([0] * n + [1], np.int32), np.full(n + 1, prompt, np.int32),
                        np.full(n + 1, 400, np.int32))
    costs = [PROFILE.model("llama-2-7b"), PROFILE.model("llama-2-70b")]
    sim = Simulator(workload, costs, get_system(system), SimConfig(8, 8, PolicyConfig(), PROFILE))
    small, big = sim.models
    for g in range(7):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
    for i, t in enumerate(admitted_at):
        sim.events.now = t
        sim._change_concurrency(small, +1)
        sim.prefill_alone[i] = small.cost.prefill_s(prompt)
        sim._admit(small, small.instances[6], i, sim.need_tokens[i])
    sim.events.now = 10.0
    set_load(small, 60.0)
    big.queue.append(n)
    big.load = 40.0
    return sim


def _run_out(sim: Simulator) -> None:
    while sim.events.next_time() < 1e9 and sim.models[0].concurrency:
        sim._handle(*sim.events.pop())


@pytest.mark.parametrize("system", ["warmserve-no-handover", "warmserve"])
def test_a_drain_for_rebalancing_hands_running_requests_over(system):
    """Three requests of "s" run on GPU 6 (admitted at t = 1..3). Without hand-over they
    finish before "big" gets 4..7; WarmServe hands them back to "s"'s queue, and they run
    again at once on its instances left, keeping their first token's time: "big" starts
    loading at once, and each request finishes exactly once."""
    sim = _handing_over(system, (1.0, 2.0, 3.0))
    small, big = sim.models
    on_6 = small.instances[6]
    first_ttft = list(sim.ttft)
    assert not sim.cap.acquire(big)
    handed = system == "warmserve"
    assert sim.cap.counts["handed_over"] == (3 if handed else 0)
    assert [i.gpus for i in big.instances] == ([(4, 5, 6, 7)] if handed else [])
    assert on_6.running == (0 if handed else 3)
    assert sum(i.running for i in small.instances if i is not on_6) == (3 if handed else 0)
    assert sim.ttft == first_ttft  # the first token was sent before the hand-over
    _run_out(sim)
    assert small.concurrency == 0 and all(i.running == 0 for i in small.instances)
    assert len(sim._stalls) == (3 if handed else 0) and min(sim._stalls, default=0.0) >= 0.0
    summary = summarize(sim._result(), 1.0)
    assert summary.get("handed_over") == (3 if handed else None)


def test_a_request_handed_over_resumes_after_the_tokens_it_sent():
    """As the live router resumes it: the new instance prefills the prompt with the tokens
    already sent and decodes only the rest. The wait for its next token is its stall, and a
    stall longer than the TTFT SLO puts the request outside the SLO, as a late first token
    would."""
    sim = _handing_over("warmserve", (9.0,))
    first, tpot = sim.arrival[0] + sim.ttft[0], sim.tpot[0]
    sent = 1 + int((10.0 - first) / tpot)
    assert 1 < sent < 400
    work = sim.models[0].prefill_work
    sim.cap.acquire(sim.models[1])
    assert (sim.input_tokens[0], sim.output_tokens[0]) == (500 + sent, 400 - sent)
    # the prefill signal counts the new prompt, as the live one counts what engines are given
    cost = sim.models[0].cost
    assert sim.models[0].prefill_work - work == pytest.approx(cost.prefill_s(500 + sent))
    resumed = [i for i in sim.models[0].instances if i.running]
    assert len(resumed) == 1 and resumed[0].gpus != (6,)
    next_token = sim._resumes_at[0]
    expected = cost.prefill_s(500 + sent)  # alone on an idle instance
    assert next_token - 10.0 == pytest.approx(expected, rel=0.05)
    _run_out(sim)
    result = sim._result()
    assert result.stall_s[0] == pytest.approx(next_token - 10.0)
    assert result.ttft_s[0] == pytest.approx(first - 9.0)  # the first token's, unchanged
    generous = summarize(result, 10.0)
    strict = summarize(result, (next_token - 10.0) * 0.9)  # the TTFT passes, the stall not
    assert result.ttft_s[0] < (next_token - 10.0) * 0.9
    assert generous["models"]["s"]["requests_within_slo"] == 1
    assert strict["models"]["s"]["requests_within_slo"] == 0
    assert (generous["stalled_past_slo"], strict["stalled_past_slo"]) == (0, 1)


def test_a_request_handed_over_before_its_first_token_starts_over():
    """Nothing was sent yet: the request is queued as if it had just arrived, its TTFT is
    counted from its arrival to the first token its new instance sends, and it has no
    stall."""
    sim = _handing_over("warmserve", (9.95,), prompt=4000)
    assert sim.arrival[0] + sim.ttft[0] > 10.0  # still prefilling at t = 10
    sim.cap.acquire(sim.models[1])
    assert (sim.input_tokens[0], sim.output_tokens[0]) == (4000, 400)
    _run_out(sim)
    result = sim._result()
    assert result.stall_s[0] == 0.0 and len(result.handover_stall_s) == 0
    assert result.ttft_s[0] > 10.0 - 9.95 + sim.models[0].cost.prefill_s(4000) * 0.95


def test_without_rebalancing_a_starving_model_waits():
    sim = two_model_sim("warmserve-no-rebalance")
    _crowd(sim, running=0)
    small, big = sim.models
    assert not sim.cap.acquire(big)
    assert len(small.instances) == 7 and not big.instances and not sim.cap.reserved


def test_rebalancing_leaves_models_without_surplus_alone():
    sim = two_model_sim("warmserve-no-overload-control")
    _crowd(sim, running=0)
    # "big" has nothing serving, so "s" counts at the engine's bound (256 each, to 80%):
    # 1,400 needs all seven
    set_load(sim.models[0], 1400.0)
    assert not sim.cap.acquire(sim.models[1])
    assert len(sim.models[0].instances) == 7 and sim.cap.counts["rebalance"] == 0


def _costs(sim: Simulator) -> None:
    """Both models' requests so far: 1,000-token prompts and 200-token answers."""
    for state in sim.models:
        state.arrived, state.output_tokens = 100, 100 * 200
        state.prefill_work = 100 * state.cost.prefill_s(1000)


def test_under_overload_every_model_gets_one_instance_first():
    """The same crowd, but overload control on: "s" and "big" need 7 + 4 GPUs of the 8, so
    each is entitled to one instance before either gets more, and "s" gives up a group."""
    sim = two_model_sim("warmserve")
    _crowd(sim, running=0)
    _costs(sim)
    set_load(sim.models[0], 1400.0)
    assert not sim.cap.acquire(sim.models[1])
    assert sim.cap.counts["rebalance"] == 1 and len(sim.models[0].instances) == 4


@pytest.mark.parametrize(("system", "rebalanced"), [("warmserve", True),
                                                    ("warmserve-no-overload-control", True),
                                                    ("warmserve-no-rebalance", False)])
def test_an_instance_counts_as_holding_what_its_kv_cache_takes(system, rebalanced):
    """"s" holds GPUs 0..3, each full at 90 requests that reserve 1,200 tokens each (its KV
    cache takes 92, not the engine's 256), with 400 in flight and requests waiting; the 7B
    "t" holds 4..7 and needs one. Counted at 256 a request, "s" would need two instances and
    be entitled to no more than it has; counted at what its KV cache takes it needs six, the
    two needs fit the node, and "t" gives up a GPU."""
    sim = two_model_sim(system, shapes={"s": "llama-2-7b", "t": "llama-2-7b"})
    small, other = sim.models
    for g in range(8):
        state, running = (small, 90) if g < 4 else (other, 15)
        inst = sim.cap.new_instance(state, (g,), ready_at=0.0)
        inst.running = running
        sim.cluster.change_kv(inst, running * 1_200)
    sim.events.now = 100.0
    _costs(sim)
    assert sim.cap._holds(small, 256) == 111_579 // 1_200
    assert sim.cap._holds(other, 256) == 92  # the size of its requests, not how many
    set_load(small, 400.0)
    small.queue.append(0)
    set_load(other, 60.0)
    assert not sim.cap.acquire(small)
    assert (sim.cap.counts["rebalance"] == 1) is rebalanced
    assert sum(1 for i in other.instances if i.accepting) == (3 if rebalanced else 4)


def _big_holds_the_node(system: str) -> Simulator:
    """"big" on both 4-GPU groups, its prefills needing 1.5 instances; "s" has nothing and
    requests waiting. Their needs, 8 + 1 GPUs, do not fit the node's 8."""
    sim = two_model_sim(system)
    small, big = sim.models
    for group in ((0, 1, 2, 3), (4, 5, 6, 7)):
        sim.cap.new_instance(big, group, ready_at=0.0)
    sim.events.now = 100.0
    _costs(sim)
    big.load = big.peak_load = 48.0
    big.prefill_load = big.peak_prefill = 1.5
    small.queue.append(0)
    set_load(small, 20.0)
    return sim


@pytest.mark.parametrize(("system", "rebalanced"), [("warmserve", True),
                                                    ("warmserve-no-overload-control", False)])
def test_under_overload_the_cheaper_model_takes_gpus_back(system, rebalanced):
    """A 7B request costs a tenth of the 70B's GPU-seconds: under overload the 70B is
    entitled to one instance, so its second counts as surplus and drains for "s". Without
    overload control the 70B needs both and "s" gets nothing."""
    sim = _big_holds_the_node(system)
    small, big = sim.models
    assert not sim.cap.acquire(small)
    assert (sim.cap.counts["rebalance"] == 1) is rebalanced
    assert sum(1 for i in big.instances if i.accepting) == (1 if rebalanced else 2)


@pytest.mark.parametrize(("system", "rebalanced"), [("warmserve", False),
                                                    ("warmserve-no-overload-control", True)])
def test_under_overload_the_dearer_model_gets_no_gpus_beyond_its_entitlement(system,
                                                                             rebalanced):
    """Two nodes. The 7B "s" holds eight GPUs and needs four; the 13B "m" holds 8..11 and
    needs four instances (8 GPUs); the 70B "big" holds 0..3 and needs two. 4 + 8 + 8 GPUs do
    not fit 16: the 7B and the 13B, cheaper per request, are entitled to their need and
    "big" to the one instance it has. Without overload control, "s"'s four instances on
    4..7 are surplus and drain for "big"."""
    sim = two_model_sim(system, num_gpus=16, shapes={"s": "llama-2-7b", "m": "llama-2-13b",
                                                     "big": "llama-2-70b"})
    small, mid, big = sim.models
    for g in (4, 5, 6, 7, 12, 13, 14, 15):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
    for group in ((8, 9), (10, 11)):
        sim.cap.new_instance(mid, group, ready_at=0.0)
    sim.cap.new_instance(big, (0, 1, 2, 3), ready_at=0.0)
    sim.events.now = 100.0
    _costs(sim)
    for state, prefill in ((small, 3.0), (mid, 3.0), (big, 1.5)):  # 4, 4 and 2 instances
        state.prefill_load = state.peak_prefill = prefill
        set_load(state, prefill * 32)
    assert not sim.cap.acquire(big)
    assert (sim.cap.counts["rebalance"] == 1) is rebalanced
    assert sum(1 for i in small.instances if i.accepting) == (4 if rebalanced else 8)


@pytest.mark.parametrize(("system", "rebalanced"), [("warmserve", True),
                                                    ("warmserve-no-prefill-signal", False)])
def test_a_model_whose_prompts_outrun_its_prefills_is_starving(system, rebalanced):
    """No request waits at the router (the router overflows), but "big"'s prompts need 1.5
    instances' prefill time: the prefill-aware signal sees it starving and frees a group."""
    sim = two_model_sim(system)
    small, big = sim.models
    for g in range(3):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
    sim.cap.new_instance(big, (4, 5, 6, 7), ready_at=0.0)
    sim.events.now = 100.0
    big.prefill_load = 1.5
    big.load = 20.0 if not rebalanced else 48.0  # the tick folds prefill in only when aware
    assert not sim.cap.acquire(big)
    assert (sim.cap.counts["rebalance"] == 1) is rebalanced
    assert (len(small.instances) == 0) is rebalanced


@pytest.mark.parametrize(("lookback", "drained"), [(False, True), (True, False)])
def test_rebalancing_spares_instances_a_model_needed_within_the_reserve_time(lookback, drained):
    """"s" has 60 in flight now but had 1,400 twenty seconds ago: counted on its latest load,
    it has instances to spare; on its peak of the last rebalance_reserve_s (60 s) it has none.
    (Overload control off: on the peak the two models' needs do not fit the node.)"""
    sim = two_model_sim(replace(get_system("warmserve"), rebalance_lookback=lookback,
                                overload_control=False))
    _crowd(sim, running=0)
    small, big = sim.models
    for t, load in [(80.0, 1400.0), (100.0, 60.0)]:
        small.load = load
        small.peak_load = peak_recent_load(small.recent_loads, t, load, 60.0)
    assert small.peak_load == 1400.0
    assert not sim.cap.acquire(big)
    assert (sim.cap.counts["rebalance"] == 1) is drained
    assert (len(small.instances) < 7) is drained


def test_a_model_with_nothing_serving_may_take_from_a_model_past_its_target():
    """With the published router, "s" at load 150 needs its 7 instances at B each; but "big"
    has nothing at all, and "s" could carry 150 on fewer instances batching to the engine's
    bound: it gives up a group."""
    sim = two_model_sim("warmserve-no-overflow")
    _crowd(sim, running=0)
    small, big = sim.models
    set_load(small, 150.0)
    assert not sim.cap.acquire(big)
    assert sim.cap.counts["rebalance"] == 1 and [i.gpus for i in big.instances] == [(4, 5, 6, 7)]
    assert len(small.instances) == 4


def test_rebalancing_moves_an_instance_out_of_the_way_when_nothing_is_surplus():
    """Six free GPUs but no free aligned four: the 7B on GPU 1 starts again on a free GPU
    outside 0..3 and keeps serving until that one is up, then drains, and the 70B gets 0..3 —
    the 7B never has fewer than two instances serving."""
    sim = two_model_sim("warmserve")
    small, big = sim.models
    for g in (1, 7):
        sim.cap.new_instance(small, (g,), ready_at=0.0)
    sim.events.now = 100.0
    set_load(small, 400.0)  # needs both instances, even batching to the engine's bound
    big.queue.append(0)
    big.load = 40.0
    assert not sim.cap.acquire(big)
    assert not big.instances and sim.cap.counts["rebalance"] == 1
    replacement = next(i for i in small.instances if i.gpus == (4,))
    assert all(i.accepting for i in small.instances)  # GPU 1 serves on while 4 loads
    sim.events.now = replacement.ready_at
    sim.cap.on_ready(replacement)
    assert sorted(i.gpus[0] for i in small.instances) == [4, 7]  # moved from 1 to 4
    assert [i.gpus for i in big.instances] == [(0, 1, 2, 3)]
    assert sim.cap.counts["cold"] == 2


def test_a_prewarm_is_ready_once_its_runner_is_built_and_activates_in_activation_s():
    sim = two_model_sim("warmserve")
    small = sim.models[0]
    sim.cap._start_prewarm(0, (1,), score=1.0)
    prewarm = sim.cluster.gpus[1].prewarms[0]
    load_s = small.cost.weight_bytes_per_gpu / PROFILE.h2d_bytes_per_s
    assert prewarm.ready_at == pytest.approx(load_s + PROFILE.runner_build_s)
    assert sim.cluster.gpus[1].pcie_free_at == pytest.approx(load_s)  # the link frees first
    sim.events.now = 10.0
    assert sim.cap.acquire(small) and sim.cap.counts["prewarm"] == 1
    assert small.instances[0].ready_at == pytest.approx(10.0 + PROFILE.activation_s)
    sim.cap.release(small.instances[0])  # back to prewarmed, ready at once (runner kept)
    assert sim.cluster.gpus[1].prewarms[0].ready_at == 10.0


def test_a_cold_start_pays_the_load_and_the_runner_build():
    sim = two_model_sim("warmserve")
    small = sim.models[0]
    assert sim.cap.acquire(small) and sim.cap.counts["cold"] == 1
    load_s = small.cost.weight_bytes_per_gpu / PROFILE.h2d_bytes_per_s
    assert small.instances[0].ready_at == pytest.approx(load_s + PROFILE.runner_build_s)
    reactive = two_model_sim("serverlessllm")
    assert reactive.cap.acquire(reactive.models[0])
    assert reactive.models[0].instances[0].ready_at >= PROFILE.engine_init_s


@pytest.mark.parametrize(("system", "entitled"), [("warmserve", [12, 4]),
                                                  ("warmserve-goodput", [1, 8])])
def test_a_need_from_arrivals_ignores_the_backlog(system, entitled):
    """Two nodes. "s" has 4,000 requests in flight, but its arrivals (2 a second at about
    0.1 GPU-s each) need one GPU; "big" arrives at 7 a second and needs two instances (its
    prefills say the same). Judged by concurrency the 7B's backlog asks for 20 GPUs, the
    cluster looks overloaded, and the cheaper 7B gets all but the 70B's floor; judged by the
    work arriving both needs fit."""
    sim = two_model_sim(system, num_gpus=16)
    small, big = sim.models
    _costs(sim)
    set_load(small, 4000.0)
    big.load = big.peak_load = 48.0
    big.prefill_load = big.peak_prefill = 1.5
    small.peak_rate, big.peak_rate = 2.0, 7.0
    assert sim.cap._entitlement(256) == entitled
