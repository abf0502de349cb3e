"""Speed of the simulator: the whole `scale` preset, and one control step at 512 GPUs.

    python benchmarks/sim_bench.py [--jobs 2] [--repeat 1]

Prints a table; asserts nothing. With --repeat N the whole preset runs N times (build and
simulation) and the table gives the median, fastest and slowest: on a small shared machine one
run's time varies by ±20%.
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
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    config, profile = load_config("h100-node"), load_profile("h100")

    builds, sims = [], []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        scenario = build_scenario("scale", config, profile)
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        simulate(scenario, list(DEFAULT_SYSTEMS), config, profile, jobs=args.jobs)
        sims.append(time.perf_counter() - start)
    totals = [b + s for b, s in zip(builds, sims, strict=True)]

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
    runs = f", median of {len(totals)}" if len(totals) > 1 else ""
    print(f"{'workload build (s' + runs + ')':44s} {statistics.median(builds):.1f}")
    print(f"{'simulate 4 policies, jobs=' + str(args.jobs) + ' (s' + runs + ')':44s} "
          f"{statistics.median(sims):.1f}")
    print(f"{'total (goal < 60 s' + runs + ')':44s} {statistics.median(totals):.1f}")
    if len(totals) > 1:
        print(f"{'total, fastest / slowest run (s)':44s} {min(totals):.1f} / {max(totals):.1f}")
    print(f"{'autoscaler tick, 64 models (ms, median)':44s} {statistics.median(ticks) * 1e3:.2f}")
    print(f"{'prewarm placement, 512 GPUs (ms, median)':44s} {statistics.median(plans) * 1e3:.2f}")
    print(f"{'control step total (goal < 50 ms)':44s} "
          f"{(statistics.median(ticks) + statistics.median(plans)) * 1e3:.2f}")


if __name__ == "__main__":
    main()
