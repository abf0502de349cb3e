"""The simulator: determinism, accounting, and each system's defining behaviour."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

import warmserve.sim.run as run_module
from warmserve.config import PolicyConfig, load_config
from warmserve.sim.profiles import load_profile, service_time_fn
from warmserve.sim.run import build_scenario, simulate, summaries
from warmserve.sim.simulator import SimConfig, Simulator
from warmserve.sim.systems import SYSTEMS, get_system
from warmserve.workload.builder import WindowSeries, Workload, WorkloadSpec

from .test_capacity import two_model_sim

PROFILE = load_profile("h100")
CONFIG = load_config("h100-node")


@pytest.fixture(scope="module")
def paper_short():
    return build_scenario("paper", CONFIG, PROFILE, duration_s=240.0)


def test_profile_has_sources_and_sane_costs():
    cost = PROFILE.model("llama-3-8b")
    assert cost.decode_step_s(1) == pytest.approx(0.00697)
    assert PROFILE.model("llama-2-70b").weight_bytes_per_gpu == 138e9 // 4
    with pytest.raises(KeyError, match="no cost profile"):
        PROFILE.model("gpt-9")


@pytest.mark.parametrize(("path", "value", "message"), [
    (("models", "llama-2-7b", "weight_gb"), -13.5, "llama-2-7b.weight_gb = -13.5 must be > 0"),
    (("models", "llama-2-7b", "decode_base_ms"), "fast", "decode_base_ms = 'fast' is not a finite"),
    (("models", "llama-2-7b", "prefill_us_per_token"), float("nan"), "= nan is not a finite"),
    (("models", "llama-2-7b", "tp"), 1.5, "models.llama-2-7b.tp = 1.5 is not a whole number"),
    (("models", "llama-2-7b"), [1, 2], "models.llama-2-7b is not a mapping"),
    (("pool_fraction",), 1.5, "pool_fraction = 1.5 must be at most 1"),
    (("h2d_gbps",), 0, "h2d_gbps = 0 must be > 0"),
    (("tensor_parallel", "efficiency"), True, "tensor_parallel.efficiency = True is not a finite"),
    (("models",), [], "its models a mapping"),
])
def test_a_bad_profile_value_is_named(tmp_path, path, value, message):
    import yaml

    from warmserve.sim.profiles import ProfileError

    shipped = resources.files("warmserve.sim").joinpath("profiles", "h100.yaml")
    data = yaml.safe_load(shipped.read_text())
    section = data
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as err:
        load_profile(str(bad))
    assert message in str(err.value) and str(bad) in str(err.value)


def test_a_profile_value_can_be_overridden_by_name():
    from warmserve.sim.profiles import ProfileError

    changed = load_profile("h100", {"engine_init_s": 0.5, "h2d_gbps": 26})
    assert (changed.engine_init_s, changed.h2d_bytes_per_s) == (0.5, 26e9)
    assert changed.models == PROFILE.models and PROFILE.engine_init_s == 2.0
    for key in ("nope", "models"):
        with pytest.raises(ProfileError, match=f"no top-level cost '{key}' to override"):
            load_profile("h100", {key: 1.0})
    with pytest.raises(ProfileError, match="h2d_gbps = 0 must be > 0"):
        load_profile("h100", {"h2d_gbps": 0})


def test_deterministic(paper_short):
    a = simulate(paper_short, ["warmserve"], CONFIG, PROFILE)["warmserve"]
    b = simulate(paper_short, ["warmserve"], CONFIG, PROFILE)["warmserve"]
    assert np.array_equal(a.ttft_s, b.ttft_s, equal_nan=True)


def test_progress_moves_forward_to_the_end_and_a_partial_run_stops_where_asked(paper_short):
    seen = []
    sim = Simulator(paper_short.workload, paper_short.costs, get_system("warmserve"),
                    SimConfig(16, 8, CONFIG.policy, PROFILE))
    result = sim.run(progress=seen.append)
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 240.0
    assert len(seen) >= 240 / 10  # about every 10 simulated seconds
    assert np.isfinite(result.ttft_s[~result.dropped]).all()
    seen.clear()
    partial = Simulator(paper_short.workload, paper_short.costs, get_system("warmserve"),
                        SimConfig(16, 8, CONFIG.policy, PROFILE))
    partial.run(progress=seen.append, stop_at_s=100.0)
    assert partial.now <= 100.0 and seen[-1] <= 100.0
    arrived = paper_short.workload.arrival_s < 100.0
    assert sum(m.arrived for m in partial.models) == arrived.sum()


@pytest.mark.parametrize("jobs", [1, 2])
def test_simulate_reports_each_policys_progress_in_this_process(paper_short, jobs):
    """What the CLI's progress bar shows: per policy, simulated seconds that only grow and end
    at the workload's duration, from worker processes too; results in the order asked."""
    seen: dict[str, list[float]] = {}
    results = simulate(paper_short, ["muxserve", "warmserve"], CONFIG, PROFILE, jobs=jobs,
                       on_progress=lambda name, t: seen.setdefault(name, []).append(t))
    assert list(results) == ["muxserve", "warmserve"]
    assert set(seen) == {"muxserve", "warmserve"}
    for values in seen.values():
        assert values == sorted(values) and values[-1] == 240.0


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_every_request_is_accounted_and_memory_is_exact(paper_short, name):
    sim = Simulator(paper_short.workload, paper_short.costs, get_system(name),
                    SimConfig(16, 8, CONFIG.policy, PROFILE))
    result = sim.run()
    served = ~result.dropped
    assert np.isfinite(result.ttft_s[served]).all() and (result.ttft_s[served] > 0).all()
    assert served.sum() + result.dropped.sum() == paper_short.workload.num_requests
    for gpu in sim.cluster.gpus:
        expected = sum(p.bytes_per_gpu for p in gpu.prewarms) + sum(
            i.cost.weight_bytes_per_gpu + i.kv_tokens * i.cost.kv_bytes_per_token // i.cost.tp
            for i in gpu.instances)
        assert gpu.used == expected <= gpu.pool_bytes
        for inst in gpu.instances:
            assert inst.kv_tokens == 0 or inst.running > 0


@pytest.mark.parametrize("name", ["warmserve", "muxserve"])
def test_the_per_model_breakdown_adds_up(paper_short, name):
    from warmserve.sim.metrics import summarize

    result = Simulator(paper_short.workload, paper_short.costs, get_system(name),
                       SimConfig(16, 8, CONFIG.policy, PROFILE)).run()
    summary = summarize(result, 1.0)
    models = summary["models"]
    assert list(models) == list(paper_short.workload.models)
    for key in ("requests_within_slo", "dropped"):
        assert sum(m[key] for m in models.values()) == summary[key]
    assert sum(m["requests"] for m in models.values()) == paper_short.workload.num_requests
    held = sum(m["gpu_seconds"] for m in models.values())
    assert held == pytest.approx(summary["gpu_seconds_busy"])
    if name == "muxserve":  # four meshes of four GPUs, one model each, held throughout
        assert len({round(m["gpu_seconds"]) for m in models.values()}) == 1


def test_dedicated_is_the_ideal(paper_short):
    results = simulate(paper_short, ["dedicated", "serverlessllm"], CONFIG, PROFILE)
    s = summaries(results, 1.0)
    assert s["dedicated"]["cold_starts"] == 0
    assert s["dedicated"]["ttft_p99_s"] <= s["serverlessllm"]["ttft_p99_s"]


def test_dedicated_provisions_each_peak_at_the_autoscalers_threshold(paper_short):
    """Each model gets its peak concurrency at 0.8 x B per instance, the load at which the
    autoscaler counts an instance full."""
    sim = Simulator(paper_short.workload, paper_short.costs, get_system("dedicated"),
                    SimConfig(16, 8, CONFIG.policy, PROFILE))
    sim.run()
    w, policy = paper_short.workload, CONFIG.policy
    for state in sim.models:
        peak = w.actual[w.models[state.index]].peak_concurrency.max()
        want = max(1, int(np.ceil(peak / (policy.scale_up_ratio * policy.instance_capacity))))
        assert len(state.instances) == want


def test_muxserve_gives_each_model_one_tensor_parallel_unit(paper_short):
    sim = Simulator(paper_short.workload, paper_short.costs, get_system("muxserve"),
                    SimConfig(16, 8, CONFIG.policy, PROFILE))
    result = sim.run()
    units = [s.instances for s in sim.models]
    assert [len(u) for u in units] == [1, 1, 1, 1]  # static: never scales
    assert all(u[0].cost.tp == len(u[0].gpus) >= s.cost.tp for u, s in zip(units, sim.models,
                                                                          strict=True))
    assert result.cold_starts == 0 and not result.dropped.any()


def _two_models_one_gpu(shares: tuple[float, float]) -> Workload:
    spec = WorkloadSpec(("a", "b"), total_rate_rps=4.0, duration_s=60.0, window_s=30.0,
                        shape="flat", history_periods=0)
    rng = np.random.default_rng(1)
    n = 200
    arrivals = np.sort(rng.uniform(0, 50, n))
    model = (rng.uniform(size=n) < shares[1]).astype(np.int32)
    return Workload(spec, ("a", "b"), arrivals, model, np.full(n, 200, np.int32),
                    np.full(n, 100, np.int32))


def test_co_located_models_slow_each_other_down():
    """Two 7B models on one GPU (MuxServe must co-locate them): model a decodes more slowly
    when b has traffic too."""
    costs = [PROFILE.model("llama-2-7b")] * 2
    config = SimConfig(1, 8, PolicyConfig(), PROFILE)
    alone = Simulator(_two_models_one_gpu((1.0, 0.0)), costs, get_system("muxserve"),
                      config).run()
    shared = Simulator(_two_models_one_gpu((0.5, 0.5)), costs, get_system("muxserve"),
                       config).run()
    a_alone = np.nanmean(alone.tpot_s[alone.model_index == 0])
    a_shared = np.nanmean(shared.tpot_s[shared.model_index == 0])
    assert a_shared > 1.2 * a_alone


def _burst_workload(history_peak: float) -> Workload:
    """One 7B model: idle for 60 s, then a burst of 40 rps for 20 s; history says so."""
    spec = WorkloadSpec(("m",), total_rate_rps=10.0, duration_s=120.0, window_s=30.0,
                        shape="flat", history_periods=0)
    rng = np.random.default_rng(0)
    arrivals = np.sort(np.concatenate([rng.uniform(0, 60, 5), rng.uniform(60, 80, 800)]))
    n = len(arrivals)
    peaks = np.array([[1.0, 1.0, history_peak, 2.0]] * 3)
    history = WindowSeries(peaks / 2, peaks, peaks / 10)
    return Workload(spec, ("m",), arrivals, np.zeros(n, np.int32), np.full(n, 300, np.int32),
                    np.full(n, 200, np.int32), history={"m": history},
                    actual={"m": WindowSeries(peaks[:1] / 2, peaks[:1], peaks[:1] / 10)})


def test_prewarming_beats_reactive_cold_starts_on_a_forecast_burst():
    workload = _burst_workload(history_peak=160.0)
    costs = [PROFILE.model("llama-2-7b")]
    config = SimConfig(8, 8, PolicyConfig(), PROFILE)
    warm = Simulator(workload, costs, get_system("warmserve"), config).run()
    cold = Simulator(workload, costs, get_system("serverlessllm"), config).run()
    assert warm.prewarm_hits >= 2 and cold.prewarm_hits == 0 and cold.cold_starts >= 2
    burst = workload.arrival_s >= 60
    assert np.percentile(warm.ttft_s[burst], 99) < np.percentile(cold.ttft_s[burst], 99) / 3


def test_service_time_uses_the_profile():
    cost = PROFILE.model("llama-2-7b")
    fn = service_time_fn([cost], batch=1)
    # 100 decode steps, each reading the request's KV: its prompt (0) and half its output
    per_token = 0.00645 + 50 * cost.decode_s_per_context_token
    assert fn(0, np.array([0]), np.array([100]))[0] == pytest.approx(0.0047 + 100 * per_token)
    longer = fn(0, np.array([1000]), np.array([100]))[0]
    assert longer == pytest.approx(0.0047 + 1000 * 21.7e-6
                                   + 100 * (0.00645 + 1050 * cost.decode_s_per_context_token))


def test_csv_workload(tmp_path):
    path = tmp_path / "req.csv"
    path.write_text("arrival_s,model,input_tokens,output_tokens\n"
                    + "".join(f"{i * 0.1:.1f},llama-2-7b-a,100,50\n" for i in range(50)))
    scenario = build_scenario(str(path), CONFIG, PROFILE)
    results = simulate(scenario, ["warmserve", "dedicated"], CONFIG, PROFILE)
    assert summaries(results, 1.0)["warmserve"]["completed"] == 50
    path.write_text("arrival_s,model,input_tokens,output_tokens\n1,nope,1,1\n")
    with pytest.raises(ValueError, match="not in the config"):
        build_scenario(str(path), CONFIG, PROFILE)
    with pytest.raises(ValueError, match="neither a preset"):
        build_scenario(str(tmp_path / "missing.csv"), CONFIG, PROFILE)


def test_gpu_seconds_count_a_kept_and_reused_instance_from_its_load():
    sim = two_model_sim("serverlessllm")
    small = sim.models[0]
    sim.cap.new_instance(small, (0,), ready_at=0.0)
    sim.events.now = 10.0
    sim.cap.release(small.instances[0])  # idle: kept alive, still holding its GPU
    sim.events.now = 20.0
    assert sim.cap.acquire(small) and sim.cap.counts["keep"] == 1
    assert small.instances[0].active_since == 20.0  # protection restarts...
    sim.events.now = 30.0
    assert sim._result().gpu_seconds_busy == pytest.approx(30.0)  # ...the GPU-seconds do not


def _simultaneous(n: int) -> Workload:
    spec = WorkloadSpec(("m",), total_rate_rps=1.0, duration_s=30.0, window_s=30.0,
                        shape="flat", history_periods=0)
    arrivals = 1.0 + np.arange(n) * 0.001
    return Workload(spec, ("m",), arrivals, np.zeros(n, np.int32), np.full(n, 100, np.int32),
                    np.full(n, 500, np.int32))


@pytest.mark.parametrize(("system", "running", "queued"), [
    ("warmserve-no-overflow", 32, 28),  # the published router: B per instance, then queue
    ("warmserve", 60, 0),  # overflow: the one instance batches them all (KV has room)
])
def test_overflow_routing_fills_instances_past_b_when_none_can_be_added(system, running,
                                                                         queued):
    """One GPU, one instance, 60 requests at once: nowhere to scale."""
    sim = Simulator(_simultaneous(60), [PROFILE.model("llama-2-7b")], get_system(system),
                    SimConfig(1, 8, PolicyConfig(), PROFILE))
    sim.run(stop_at_s=1.5)
    (inst,) = sim.models[0].instances
    assert inst.running == running and len(sim.models[0].queue) == queued


def test_the_lookback_keeps_the_loads_of_the_reserve_time_only(paper_short):
    sim = Simulator(paper_short.workload, paper_short.costs, get_system("warmserve"),
                    SimConfig(16, 8, CONFIG.policy, PROFILE))
    sim.run(stop_at_s=150.0)
    horizon = CONFIG.policy.rebalance_reserve_s
    for state in sim.models:
        times = [t for t, _ in state.recent_loads]
        assert times and times[-1] - times[0] <= horizon and times[-1] == 150.0
        assert state.recent_loads[-1][1] == state.load
        assert state.peak_load == state.recent_loads[0][1] >= state.load


@pytest.mark.parametrize(("system", "aware"), [("warmserve", True),
                                               ("warmserve-no-prefill-signal", False)])
def test_the_tick_counts_prefill_work_of_the_last_load_window(system, aware):
    """200 prompts of 2,000 tokens to the 70B in one second: its prefill load over the 5-s
    window is their prefill time over 5 s, and its load, prefill-aware, is that many times B."""
    spec = WorkloadSpec(("s", "big"), total_rate_rps=1.0, duration_s=30.0, window_s=30.0,
                        shape="flat", history_periods=0)
    n = 200
    workload = Workload(spec, ("s", "big"), np.linspace(10.0, 11.0, n), np.ones(n, np.int32),
                        np.full(n, 2000, np.int32), np.full(n, 10, np.int32))
    costs = [PROFILE.model("llama-2-7b"), PROFILE.model("llama-2-70b")]
    sim = Simulator(workload, costs, get_system(system), SimConfig(8, 8, PolicyConfig(), PROFILE))
    sim.run(stop_at_s=13.0)
    big = sim.models[1]
    work = n * costs[1].prefill_s(2000)
    assert big.prefill_work == pytest.approx(work)
    if aware:
        assert big.prefill_load == pytest.approx(work / 5.0, rel=0.01)
        assert big.load == pytest.approx(big.prefill_load * 32, rel=1e-6)
    else:
        assert big.prefill_load == 0.0 and big.load < 200


def test_the_goodput_variant_tracks_each_models_arrival_rate(paper_short):
    """`warmserve-goodput` keeps each model's arrivals per second over the load window and
    their peak over the look-back; the other systems do not need them."""
    sims = {name: Simulator(paper_short.workload, paper_short.costs, get_system(name),
                            SimConfig(16, 8, CONFIG.policy, PROFILE))
            for name in ("warmserve-goodput", "warmserve")}
    for sim in sims.values():
        sim.run(stop_at_s=120.0)
    w, window = paper_short.workload, CONFIG.policy.load_window_s
    for state in sims["warmserve-goodput"].models:
        mine = w.arrival_s[w.model_index == state.index]
        recent = np.sum((mine > sims["warmserve-goodput"].now - window)
                        & (mine <= sims["warmserve-goodput"].now))
        assert state.arrival_rate == pytest.approx(recent / window, abs=1.0 / window)
        assert state.peak_rate >= state.arrival_rate > 0
    assert all(s.peak_rate == 0.0 for s in sims["warmserve"].models)


def test_window_means_of_a_step_function():
    from warmserve.sim.report import _time_weighted_mean

    # 1 from t=0, 3 from t=30, 2 from t=90; windows of 60 s
    means = _time_weighted_mean([0.0, 30.0, 90.0], [1, 3, 2], np.array([0.0, 60.0, 120.0]),
                                60.0)
    assert means.tolist() == [2.0, 2.5, 2.0]
    # before the first change the count is 0
    assert _time_weighted_mean([30.0], [4], np.array([0.0]), 60.0).tolist() == [2.0]


def test_the_timeline_plots_the_busiest_models_first():
    from warmserve.sim.report import busiest_models

    spec = WorkloadSpec(("a", "b", "c"), 1.0, 10.0, shape="flat")
    index = np.array([2, 0, 2, 1, 2, 0], dtype=np.int32)
    w = Workload(spec, spec.models, np.arange(6.0), index, np.ones(6, np.int32),
                 np.ones(6, np.int32))
    assert busiest_models(w, 2) == ["c", "a"]
    assert busiest_models(w, 8) == ["c", "a", "b"]


def _muxserve_breaks(args):
    """run._run_one, except that muxserve's run fails (module level: the pool pickles it)."""
    if args[1] == "muxserve":
        raise RuntimeError("muxserve broke")
    return _RUN_ONE(args)


_RUN_ONE = run_module._run_one


def test_a_failed_run_stops_the_parallel_runs_and_is_raised(paper_short, monkeypatch):
    monkeypatch.setattr(run_module, "_run_one", _muxserve_breaks)
    with pytest.raises(RuntimeError, match="muxserve broke"):
        simulate(paper_short, ["warmserve", "muxserve", "dedicated"], CONFIG, PROFILE, jobs=2)


def test_ctrl_c_stops_a_parallel_simulation_at_once():
    """The workers ignore the interrupt; the parent stops them. Before, a policy already
    queued to a worker ran to its end first: 14-24 s on `scale`, against about 1 s now."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "warmserve.cli", "simulate", "--workload", "scale",
               "--jobs", "2", "--json"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # past the workload's build, into the runs
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
    started = time.monotonic()
    child.wait(timeout=60)
    assert child.returncode == 130 and time.monotonic() - started < 10
