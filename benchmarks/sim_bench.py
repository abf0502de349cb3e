"""Speed of the simulator: the whole `scale` preset, and one control step at 512 GPUs.

    python benchmarks/sim_bench.py [--jobs 2]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

from warmserve.config import load_config
from warmserve.sim.profiles import load_profile
from warmserve.sim.run import build_scenario, simulate
from warmserve.sim.simulator import SimConfig, Simulator
from warmserve.sim.systems import DEFAULT_SYSTEMS, get_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    config, profile = load_config("h100-node"), load_profile("h100")

    start = time.perf_counter()
    scenario = build_scenario("scale", config, profile)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    simulate(scenario, list(DEFAULT_SYSTEMS), config, profile, jobs=args.jobs)
    sim_s = time.perf_counter() - start

    # One control step mid-run: the autoscaler tick over 64 models, and the forecast +
    # evict-aware prewarm placement over 512 GPUs that runs at each window boundary.
    sim = Simulator(scenario.workload, scenario.costs, get_system("warmserve"),
                    SimConfig(scenario.num_gpus, scenario.gpus_per_node, config.policy, profile))
    sim.run(stop_at_s=1800.0)
    ticks, plans = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        sim._tick()
        t1 = time.perf_counter()
        sim.cap.plan_prewarms()
        t2 = time.perf_counter()
        ticks.append(t1 - t0)
        plans.append(t2 - t1)
    w = scenario.workload
    print(f"\nscale preset: {w.num_requests} requests, {len(w.models)} models, "
          f"{scenario.num_gpus} GPUs, {w.spec.duration_s:.0f} s simulated")
    print(f"{'metric':44s} value")
    print(f"{'workload build (s)':44s} {build_s:.1f}")
    print(f"{'simulate 4 policies, jobs=' + str(args.jobs) + ' (s)':44s} {sim_s:.1f}")
    print(f"{'total (goal < 60 s)':44s} {build_s + sim_s:.1f}")
    print(f"{'autoscaler tick, 64 models (ms, median)':44s} {statistics.median(ticks) * 1e3:.2f}")
    print(f"{'prewarm placement, 512 GPUs (ms, median)':44s} {statistics.median(plans) * 1e3:.2f}")
    print(f"{'control step total (goal < 50 ms)':44s} "
          f"{(statistics.median(ticks) + statistics.median(plans)) * 1e3:.2f}")


if __name__ == "__main__":
    main()
