"""What the presets are built to be, checked against the simulator that runs them."""

from __future__ import annotations

import pytest

from warmserve.config import load_config
from warmserve.sim.profiles import load_profile
from warmserve.sim.run import build_scenario
from warmserve.sim.simulator import SimConfig, Simulator
from warmserve.sim.systems import get_system

PROFILE = load_profile("h100")
CONFIG = load_config("h100-node")


def dedicated_gpus(preset: str) -> tuple[int, int]:
    """GPUs the dedicated system provisions for the preset's peaks, and the preset's cluster."""
    scenario = build_scenario(preset, CONFIG, PROFILE)
    sim = Simulator(scenario.workload, scenario.costs, get_system("dedicated"),
                    SimConfig(scenario.num_gpus, scenario.gpus_per_node, CONFIG.policy, PROFILE))
    sim.run(stop_at_s=0.0)  # places the start-up instances only
    return sum(1 for g in sim.cluster.gpus if g.instances), scenario.num_gpus


def test_the_paper_preset_is_over_committed_twice_at_the_peaks():
    """`paper` is the situation multi-LLM sharing is for: its models' peaks, each served on
    its own GPUs, would take twice the cluster. Past that every shared system is overloaded
    (docs/simulation.md); a cost-profile change that moves it must move the rate too."""
    needed, cluster = dedicated_gpus("paper")
    assert needed / cluster == pytest.approx(2.0, abs=0.25)
