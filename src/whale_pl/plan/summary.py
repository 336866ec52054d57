"""Figures of the evaluation with paired bootstrap intervals: start states are resampled within each task
(tasks are strata) with the same indices for every method, so a difference of two methods is paired."""

from __future__ import annotations

import numpy as np

from whale_pl.rollout.stats import LEVEL, N_BOOT, interval, verdict
from whale_pl.rollout.value import discounted_return

NAMES = {"plan_none": "plan, no penalty", "plan_retracing": "plan + retracing penalty",
         "plan_ensemble": "plan + ensemble penalty", "behavior": "best behavior policy in the data",
         "bc": "behavior cloning", "random": "random actions"}


def episode_figures(ep: dict, discount: float) -> dict[str, float]:
    """Real return and success of an episode; for a planned one also the imagined return of the executed
    actions (each decision's first imagined reward), imagined success (any first-step success prob > 0.5),
    their exploitation (imagined − real return) and consistency (imagined success == real success)."""
    out = {"return": float(discounted_return(ep["rewards_D"], discount)), "success": float(ep["success"])}
    if "imagined_rewards_D" in ep:
        out["imagined_return"] = float(discounted_return(ep["imagined_rewards_D"], discount))
        out["exploitation"] = out["imagined_return"] - out["return"]
        imag_success = bool((np.asarray(ep["imagined_success_D"]) > 0.5).any())
        out["consistency"] = float(imag_success == bool(ep["success"]))
        out["uncertainty"] = float(np.mean(ep["uncertainty_D"]))
    return out


def grids(per_task: dict[str, dict[str, list]], discount: float) -> dict[str, dict[str, np.ndarray]]:
    """method -> figure -> [T, K] over tasks and start states."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in next(iter(per_task.values())):
        rows = [[episode_figures(ep, discount) for ep in eps[m]] for eps in per_task.values()]
        out[m] = {f: np.array([[r[f] for r in row] for row in rows]) for f in rows[0][0]}
    return out


def _ci(x_TK: np.ndarray, idx: np.ndarray, level: float) -> list[float]:
    """The bootstrap interval of the mean; undefined with one start state per task (nothing to resample)."""
    if idx.shape[2] < 2:
        return [float("nan")] * 2
    return interval(np.take_along_axis(np.broadcast_to(x_TK, idx.shape), idx, axis=2).mean(axis=(1, 2)), level)


def with_interval(x_TK: np.ndarray, idx: np.ndarray, level: float = LEVEL) -> dict:
    """Mean over tasks and starts, and its bootstrap interval."""
    return {"mean": float(np.mean(x_TK)), "ci": _ci(x_TK, idx, level)}


def compare(a_TK: np.ndarray, b_TK: np.ndarray, a: str, b: str, idx: np.ndarray, level: float = LEVEL) -> dict:
    """Paired difference a − b with its interval; "<a> beats <b>" only when the interval excludes zero."""
    d = float(np.mean(a_TK - b_TK))
    ci = _ci(a_TK - b_TK, idx, level)
    return {"diff": d, "ci": ci, "verdict": verdict(d, *ci, f"{a} beats {b}", f"{b} beats {a}")}


def summarise(per_task: dict[str, dict[str, list]], discount: float) -> dict:
    """Every method's success rate and return, each planner's exploitation and consistency, with intervals;
    paired comparisons of each planner with each other method."""
    g = grids(per_task, discount)
    T, K = next(iter(g.values()))["return"].shape
    idx = np.random.default_rng(0).integers(0, K, (N_BOOT, T, K))  # start states resampled within each task
    methods = {m: {f: with_interval(v, idx) for f, v in figs.items()} for m, figs in g.items()}
    comps = {}
    planners = [m for m in g if m.startswith("plan_")]
    for i, a in enumerate(planners):
        for b in [*planners[i + 1:], *[m for m in g if not m.startswith("plan_")]]:
            for f in ("return", "success"):
                comps[f"{a} - {b} ({f})"] = compare(g[a][f], g[b][f], a, b, idx)
    return {"methods": methods, "comparisons": comps, "tasks": list(per_task), "starts": K,
            "per_task": {m: {f: v.mean(1).tolist() for f, v in figs.items()} for m, figs in g.items()}}
