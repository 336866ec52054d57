"""Decisions per second of the CEM planner in imagination (whale_pl.plan) at the demo reference setting:
N=64 candidates, H=4, 3 CEM iterations, the other settings of stages/demo/plan.yaml, on the experiment's
on-model of seed 0 (runs/demo/experiment/<N>_steps/on/0), from a real first frame of the dataset.

    .venv/bin/python benchmarks/plan.py [--samples 64 --horizon 4 --iterations 3] [--penalties none retracing]
        [--decisions 2] [--threads 1] [--unshared]

Each decision is one ``Planner.plan`` (the N candidates of an iteration imagined in one batch). Last line:
``plan_decisions_per_s: <none-penalty decisions/s> decisions/s``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch


def main() -> None:
    """Time a few planning decisions per penalty; print decisions/s, the penalty-free figure last."""
    from whale_pl.plan.cem import History, Planner, load_plan_yaml
    from whale_pl.plan.cli import experiment_members
    from whale_pl.rollout.value import WorldModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="stages/demo/plan.yaml")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--penalties", nargs="+", default=["none"], choices=["none", "retracing", "ensemble"])
    p.add_argument("--decisions", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unshared", action="store_true", help="also time the penalty-free planner with each "
                   "candidate priming its own copy of the history's keys/values (the ratio, side by side)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    plan, ev = load_plan_yaml(a.config)
    plan = replace(plan, samples=a.samples, horizon=a.horizon, iterations=a.iterations).check()
    members = [WorldModel.load(c) for c in experiment_members("demo", ev)]
    wm = members[0]
    g = torch.Generator().manual_seed(0)
    V, (h, w) = wm.model.codebook_size, wm.model.grid_hw
    hist = History(torch.randint(0, V, (plan.context, h, w), generator=g),
                   torch.randn(plan.context - 1, wm.model.action_dim, generator=g))
    rates = {}
    for pen in [x for x in a.penalties if x != "none"] + ["none"]:
        planner = Planner(wm, plan, pen, 1.0, members=members if pen == "ensemble" else ())
        t0 = time.perf_counter()
        for _ in range(a.decisions):
            planner.plan(hist)
        rates[pen] = a.decisions / (time.perf_counter() - t0)
        print(f"{pen}: {rates[pen]:.3f} decisions/s (N={plan.samples}, H={plan.horizon}, {plan.iterations} "
              f"iterations, context {plan.context}, {planner.steps} MaskGIT step(s), threads {a.threads})", flush=True)
    if a.unshared:
        model = wm.model
        model.imagine = lambda *x, **k: type(model).imagine(model, *x, **{**k, "shared_context": False})
        planner, t0 = Planner(wm, plan, "none", 1.0), time.perf_counter()
        for _ in range(a.decisions):
            planner.plan(hist)
        unshared = a.decisions / (time.perf_counter() - t0)
        print(f"none, history keys/values per candidate: {unshared:.3f} decisions/s (shared: "
              f"{rates['none'] / unshared:.2f}x)", flush=True)
    print(f"plan_decisions_per_s: {rates['none']:.3f} decisions/s")


if __name__ == "__main__":
    main()
