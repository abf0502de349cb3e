"""The `paper` preset over seeds and total rates: how robust is each comparison?

    python benchmarks/paper_sweep.py [--seeds 0,1,2,3,4] [--rates 20,40,60,80]
                                     [--policies warmserve,serverlessllm,muxserve,dedicated]
                                     [--workload paper] [--jobs 2]
                                     [--profile h100] [--profile-set engine_init_s=0.5 ...]
                                     [--plot attainment.png]

For every (rate, seed) it simulates the policies on the same workload and prints one line;
then, per rate, the median over seeds of each policy's P99 TTFT, the median ratio
ServerlessLLM P99 / WarmServe P99 (and in how many seeds it reaches 10x), and the median ratio
of requests within the TTFT SLO, WarmServe / MuxServe; then each policy's median requests within
the SLO per rate, and its median SLO attainment. Last, each policy's capacity: the highest
total rate at which the median SLO attainment (requests within the TTFT SLO over all requests)
stays at or above 90% and 99%, interpolated linearly between the rates swept (">" when it holds
at the highest rate, "<" when not even at the lowest). `--profile-set KEY=VALUE` replaces a
top-level cost of the profile (how the comparisons depend on it). `--plot FILE` draws each
policy's median SLO attainment against the rate, with the 90% and 99% bars. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from warmserve.config import load_config
from warmserve.sim.profiles import ProfileError, load_profile, parse_override
from warmserve.sim.run import build_scenario, simulate, summaries
from warmserve.sim.systems import get_system


def _listed(kind: type[int] | type[float]):
    """An argparse type: a non-empty comma-separated list of positive numbers (seeds >= 0)."""
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{kind.__name__}s") from None
        if not values or any(v < 0 or (kind is float and v == 0) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more, each "
                                             f"{'>= 0' if kind is int else '> 0'}")
        return values
    return parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="paper")
    ap.add_argument("--seeds", type=_listed(int), default="0,1,2,3,4")
    ap.add_argument("--rates", type=_listed(float), default="20,40,60,80")
    ap.add_argument("--policies", default="warmserve,serverlessllm,muxserve,dedicated")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--profile", default="h100", help="cost profile name or YAML file")
    ap.add_argument("--profile-set", dest="set", type=_setting, action="append", default=[],
                    metavar="KEY=VALUE", help="replace a top-level cost of the profile "
                    "(repeatable)")
    ap.add_argument("--plot", type=Path, help="write the attainment curves here (PNG)")
    args = ap.parse_args()
    if args.plot is not None and not args.plot.parent.is_dir():
        ap.error(f"--plot {args.plot}: no folder {args.plot.parent}")
    config = load_config("h100-node")
    try:
        profile = load_profile(args.profile, dict(args.set))
    except ProfileError as exc:
        ap.error(str(exc))
    if args.set:
        print("profile " + args.profile + ", " + ", ".join(f"{k} = {v:g}" for k, v in args.set))
    policies = args.policies.split(",")
    for name in policies:
        try:
            get_system(name)
        except ValueError as exc:
            ap.error(str(exc))
    seeds = args.seeds
    seed_list = ",".join(map(str, seeds))
    slo = config.policy.ttft_slo_s
    rows: dict[float, list[dict[str, dict]]] = {}
    print("rate seed " + " ".join(f"{p[:14]:>24s}" for p in policies) + "   (P99 s / within SLO)")
    for rate in args.rates:
        for seed in seeds:
            try:
                scenario = build_scenario(args.workload, config, profile, seed=seed,
                                          rate_rps=rate)
            except ValueError as exc:  # a workload that is no preset: before any run
                ap.error(str(exc))
            summary = summaries(simulate(scenario, policies, config, profile, args.jobs), slo)
            rows.setdefault(rate, []).append(summary)
            cells = [f"{summary[p]['ttft_p99_s']:9.2f} / {_within(summary[p]):7d}"
                     for p in policies]
            print(f"{rate:4.0f} {seed:4d} " + " ".join(f"{c:>24s}" for c in cells), flush=True)

    print(f"\nmedians over seeds {seed_list}")
    header = ["rate"] + [f"P99 {p}" for p in policies]
    if {"warmserve", "serverlessllm"} <= set(policies):
        header += ["SLLM/WS P99", "seeds >= 10x"]
    if {"warmserve", "muxserve"} <= set(policies):
        header += ["WS/Mux within SLO"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for rate, runs in rows.items():
        cells = [f"{rate:.0f}"] + [
            f"{statistics.median(r[p]['ttft_p99_s'] for r in runs):.2f} s" for p in policies]
        if {"warmserve", "serverlessllm"} <= set(policies):
            ratios = [r["serverlessllm"]["ttft_p99_s"] / r["warmserve"]["ttft_p99_s"]
                      for r in runs]
            cells += [f"{statistics.median(ratios):.2f}x",
                      f"{sum(x >= 10 for x in ratios)}/{len(ratios)}"]
        if {"warmserve", "muxserve"} <= set(policies):
            within = [_within(r["warmserve"]) / max(_within(r["muxserve"]), 1) for r in runs]
            cells += [f"{statistics.median(within):.2f}x"]
        print("| " + " | ".join(cells) + " |")

    print(f"\nmedian requests within the SLO over seeds {seed_list}")
    print("| rate | " + " | ".join(policies) + " |")
    print("|" + "---|" * (len(policies) + 1))
    for rate, runs in rows.items():
        print(f"| {rate:.0f} | " + " | ".join(
            f"{int(statistics.median(_within(r[p]) for r in runs)):,}" for p in policies) + " |")

    rates = list(rows)
    attainment = {p: [statistics.median(r[p]["slo_attainment"] for r in rows[rate])
                      for rate in rates] for p in policies}
    print(f"\nmedian SLO attainment over seeds {seed_list}")
    print("| rate | " + " | ".join(policies) + " |")
    print("|" + "---|" * (len(policies) + 1))
    for k, rate in enumerate(rates):
        print(f"| {rate:.0f} | " + " | ".join(f"{attainment[p][k]:.2%}" for p in policies) + " |")

    print("\ncapacity (requests/s) at median SLO attainment >= 90% / >= 99%")
    print("| policy | 90% | 99% |\n|---|---|---|")
    for p in policies:
        print(f"| {p} | {_capacity(rates, attainment[p], 0.90)} | "
              f"{_capacity(rates, attainment[p], 0.99)} |")
    if args.plot is not None:
        _plot(args.plot, rates, attainment, f"{args.workload}, median over seeds {seed_list}")
        print(f"\nwrote {args.plot}")


def _plot(path: Path, rates: list[float], attainment: dict[str, list[float]], title: str
          ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for policy, values in attainment.items():
        ax.plot(rates, [100 * v for v in values], marker="o", markersize=3, label=policy)
    for bar in (90, 99):
        ax.axhline(bar, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("total request rate (requests/s)")
    ax.set_ylabel("requests within the TTFT SLO (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setting(text: str) -> tuple[str, float]:
    parsed = parse_override(text)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=NUMBER")
    return parsed


def _capacity(rates: list[float], attainment: list[float], bar: float) -> str:
    if attainment[0] < bar:
        return f"< {rates[0]:.0f}"
    for k in range(1, len(rates)):
        if attainment[k] < bar:
            r0, r1, a0, a1 = rates[k - 1], rates[k], attainment[k - 1], attainment[k]
            return f"{r0 + (r1 - r0) * (a0 - bar) / (a0 - a1):.0f}"
    return f"> {rates[-1]:.0f}"


def _within(row: dict) -> int:
    return row["requests_within_slo"]


if __name__ == "__main__":
    main()
