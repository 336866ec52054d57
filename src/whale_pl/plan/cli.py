"""``whale plan`` / ``python -m whale_pl.plan --scale demo`` / ``make mbpo``: CEM control of Meta-World in the
experiment's on-models (seed 0 plans, seeds 0..M-1 form the ensemble), λ chosen on separate start states, every
planner and baseline judged from the same start states with paired intervals; writes ``runs/<scale>/mbpo.json``,
``mbpo.md``, ``mbpo_success.png``, ``mbpo_episode.gif`` and rebuilds ``report.md``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from whale_pl.io import write_json_atomic, write_text_atomic
from whale_pl.plan.cem import EvalConfig, PlanConfig, load_plan_yaml
from whale_pl.plan.evaluate import (TaskJob, best_policies, check_disjoint, choose_lambdas, run_jobs, train_bc,
                                    training_episodes)
from whale_pl.rollout.value import WorldModel, discounted_return, frame_stride_of, start_seeds
from whale_pl.rollout.value_metrics import N_BOOT, fmt_key, interval, nan_to_none, verdict

NAMES = {"plan_none": "plan, no penalty", "plan_retracing": "plan + retracing penalty",
         "plan_ensemble": "plan + ensemble penalty", "behavior": "best behavior policy in the data",
         "bc": "behavior cloning", "random": "random actions"}


def episode_figures(ep: dict, discount: float) -> dict[str, float]:
    """Real return and success; a planned episode's imagined return, exploitation, consistency, uncertainty."""
    out = {"return": float(discounted_return(ep["rewards_D"], discount)), "success": float(ep["success"])}
    if "imagined_rewards_D" in ep:
        out["imagined_return"] = float(discounted_return(ep["imagined_rewards_D"], discount))
        out["exploitation"] = out["imagined_return"] - out["return"]
        imag_success = bool((np.asarray(ep["imagined_success_D"]) > 0.5).any())
        out["consistency"] = float(imag_success == bool(ep["success"]))
        out["uncertainty"] = float(np.mean(ep["uncertainty_D"]))
    return out


def with_interval(x_TK: np.ndarray, idx: np.ndarray) -> dict:
    """Mean over tasks and starts, and its bootstrap interval (undefined with one start state per task)."""
    boot = np.take_along_axis(np.broadcast_to(x_TK, idx.shape), idx, axis=2).mean(axis=(1, 2))
    return {"mean": float(np.mean(x_TK)), "mean_ci": interval(boot) if idx.shape[2] > 1 else [float("nan")] * 2}


def compare(a_TK: np.ndarray, b_TK: np.ndarray, a: str, b: str, idx: np.ndarray) -> dict:
    """Paired difference a − b with its interval; "<a> beats <b>" only when the interval excludes zero."""
    d, ci = with_interval(a_TK - b_TK, idx).values()
    return {"diff": d, "diff_ci": ci, "verdict": verdict(d, *ci, f"{a} beats {b}", f"{b} beats {a}")}


def summarise(per_task: dict[str, dict[str, list]], discount: float) -> dict:
    """Every method's figures with intervals; paired comparisons of each planner with each other method."""
    g: dict[str, dict[str, np.ndarray]] = {}  # method -> figure -> [T, K] over tasks and start states
    for m in next(iter(per_task.values())):
        rows = [[episode_figures(ep, discount) for ep in eps[m]] for eps in per_task.values()]
        g[m] = {f: np.array([[r[f] for r in row] for row in rows]) for f in rows[0][0]}
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


def plot_success(res: dict, path: Path) -> None:
    """Bar plot of the success rate per method with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = res["summary"]["methods"]
    names = list(ms)
    mean = [ms[m]["success"]["mean"] for m in names]
    lo = [max(0.0, mean[i] - ms[m]["success"]["mean_ci"][0]) for i, m in enumerate(names)]
    hi = [max(0.0, ms[m]["success"]["mean_ci"][1] - mean[i]) for i, m in enumerate(names)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), mean, yerr=[lo, hi], capsize=4, color=["C0"] * 3 + ["C7"] * (len(names) - 3))
    ax.set_xticks(range(len(names)), [NAMES.get(m, m).replace(" ", "\n", 2) for m in names], fontsize=7)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    s = res["summary"]
    ax.set_title(f"Meta-World success, {len(s['tasks'])} tasks x {s['starts']} start states (95 % interval)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_lines(res: dict) -> list[str]:
    """The table of every method's figures with intervals."""
    L = ["| method | success rate | return | imagined − real return | consistency rate | λ |",
         "|---|---|---|---|---|---|"]
    for m, f in res["summary"]["methods"].items():
        lam = res["lambdas"]["chosen"].get(m.removeprefix("plan_"), 0.0 if m == "plan_none" else None)
        L.append(f"| {NAMES.get(m, m)} | {fmt_key(f['success'], 'mean', 2)} | {fmt_key(f['return'], 'mean', 1)} | "
                 f"{fmt_key(f.get('exploitation', {}), 'mean', 1)} | {fmt_key(f.get('consistency', {}), 'mean', 2)} | "
                 f"{'' if lam is None else lam} |")
    return L


def md_lines(res: dict) -> list[str]:
    """The whole of ``mbpo.md``."""
    s, p = res["summary"], res["plan"]
    L = [f"# Model-based control in imagination ({res['scale']} scale)", "",
         f"Command: `{res['command']}` ({res['seconds'] / 60:.1f} min). Planner: CEM, N={p['samples']} candidates of "
         f"H={p['horizon']} decisions, {p['iterations']} iterations ({p['elites']} elites), {p['context']} real "
         f"context frame(s), {res['maskgit_steps']} MaskGIT step(s) per imagined frame, discount {p['discount']}; "
         f"retracing K={p['K']}; ensemble of {len(res['members'])} on-models ({', '.join(res['members'])}); the "
         f"planning model is the first. A decision is held {res['hold']} simulator steps (the model's clock); "
         f"{res['decisions']} decisions an episode. z: the behavior prior over the real history, then the imagined "
         "frames with the candidate's actions.", "",
         f"Evaluation: tasks {', '.join(s['tasks'])}, {s['starts']} start states each (seed base "
         f"{res['evaluate']['seed']}, disjoint from the dataset's episode seeds), the same for every method. λ "
         f"chosen on {res['evaluate']['tune_starts']} other start state(s) per task (seed base "
         f"{res['evaluate']['tune_seed']}) by mean real return: " +
         "; ".join(f"{pen}: {g} -> {res['lambdas']['chosen'][pen]}" for pen, g in res["lambdas"]["grid"].items()) +
         ". Returns are discounted per decision. The figures (imagined − real return: model exploitation) and "
         "their paired intervals: docs/method.md, \"Planning in imagination\".", "", *table_lines(res), "",
         "## Paired comparisons", "", "| comparison | difference | verdict |", "|---|---|---|"]
    L += [f"| {k} | {fmt_key(v, 'diff', 2)} | {v['verdict']} |" for k, v in s["comparisons"].items()]
    return L + ["", f"![success per method]({Path(res['plot']).name})", "",
                f"One planned episode ({s['tasks'][0]}, retracing penalty): "
                f"![planned episode]({Path(res['gif']).name})", ""]


def experiment_members(scale: str, ev: EvalConfig) -> list[str]:
    """The on-models' checkpoints (seeds 0..M-1) of the ``<N>_steps`` experiment folder with the most of them."""
    exp = Path("runs") / scale / "experiment"
    groups = sorted(exp.glob("*_steps"), key=lambda g: (len(list(g.glob("on/*/DONE"))), g.name))
    done = sorted(groups[-1].glob("on/*/DONE"), key=lambda p: int(p.parent.name)) if groups else []
    if len(done) < ev.members:
        raise SystemExit(f"[plan] need {ev.members} finished on-models under {exp}: run "
                         f"`make experiment SCALE={scale}` (or `python -m whale_pl.experiment --scale {scale} "
                         f"--train-only --members {ev.members}`)")
    return [json.loads(p.read_text())["ckpt"] for p in done[: ev.members]]


def _setting(scale: str, ev: EvalConfig, members: list[str]) -> dict:
    """What the jobs share: tasks, start states (checked disjoint from the dataset), clock, baselines."""
    from whale_pl.data.metaworld import CollectConfig

    c = CollectConfig.from_yaml(Path("stages") / scale / "data.yaml")
    seeds = {k: {t: start_seeds(base, t, n) for t in c.tasks}
             for k, base, n in (("tune", ev.tune_seed, ev.tune_starts), ("eval", ev.seed, ev.starts))}
    check_disjoint([x for v in seeds.values() for xs in v.values() for x in xs], c)
    stride = frame_stride_of(members[0])
    eps = training_episodes(c.out)
    return {"tasks": list(c.tasks), "size": c.size, "camera": c.camera, "decisions": c.max_steps // stride,
            "hold": c.action_repeat * stride, "best": best_policies(eps), "bc": train_bc(eps), "seeds": seeds}


def _jobs(s: dict, plan: PlanConfig, members: list[str], lambdas: dict, final: bool) -> list[TaskJob]:
    """One job per task and tuning start state, or (``final``) evaluation start state with the baselines."""
    seeds = s["seeds"]["eval" if final else "tune"]
    return [TaskJob(t, seed, lambdas, members, plan, s["size"], s["camera"], s["decisions"], s["hold"],
                    {"bc": s["bc"], "behavior": s["best"][t]["policy"]} if final else {},
                    "plan_retracing" if final and (i, j) == (0, 0) else "")
            for i, t in enumerate(s["tasks"]) for j, seed in enumerate(seeds[t])]


def evaluate(scale: str, plan: PlanConfig, ev: EvalConfig) -> dict:
    """Choose λ, then run every method from the evaluation start states; the raw episodes per task."""
    members = experiment_members(scale, ev)
    s = _setting(scale, ev, members)
    print(f"[plan] {len(s['tasks'])} tasks, {s['decisions']} decisions x {s['hold']} steps; members {members}; "
          f"best behavior policies {({t: v['policy'] for t, v in s['best'].items()})}", flush=True)
    t0 = time.time()
    lams = choose_lambdas(ev, lambda pen, lam: _jobs(s, plan, members, {pen: lam}, False), plan.discount)
    print(f"[plan] lambda chosen in {time.time() - t0:.0f} s: {lams}", flush=True)
    lambdas = {"none": 0.0, **{pen: lams["chosen"][pen] for pen in ("retracing", "ensemble")}}
    jobs = _jobs(s, plan, members, lambdas, True)
    per_task: dict[str, dict[str, list]] = {}  # task -> method -> episodes, in start order
    for job, res in zip(jobs, run_jobs(jobs, ev.jobs, "evaluation")):
        for method, eps in res.items():
            per_task.setdefault(job.task, {}).setdefault(method, []).extend(eps)
    return {"per_task": per_task, "setting": s, "members": members, "lambdas": lams}


def finish(scale: str, command: str, plan: PlanConfig, ev: EvalConfig, out: dict, t_start: float) -> dict:
    """Summaries, plot, GIF, ``mbpo.json`` / ``mbpo.md`` and the rebuilt ``report.md``."""
    from whale_pl.report import main as report_main
    from whale_pl.rollout.gif import write_rollout_gif

    root, s = Path("runs") / scale, out["setting"]
    ep = next(e for r in out["per_task"].values() for e in r["plan_retracing"] if "frames" in e)
    wm = WorldModel.load(out["members"][0])
    res = {"scale": scale, "command": command, "plan": asdict(plan),
           "evaluate": asdict(ev), "members": out["members"], "lambdas": out["lambdas"],
           "maskgit_steps": plan.maskgit_steps or wm.steps, "decisions": s["decisions"], "hold": s["hold"],
           "best_behavior": s["best"], "summary": summarise(out["per_task"], plan.discount),
           "plot": str(root / "mbpo_success.png"), "gif": str(root / "mbpo_episode.gif")}
    plot_success(res, Path(res["plot"]))
    # each decision's real frame beside the one the model imagined (the plan's first step), with its uncertainty
    write_rollout_gif(Path(res["gif"]), np.ascontiguousarray(np.asarray(ep["frames"])[1:].transpose(0, 3, 1, 2)),
                      wm.decode(ep["imagined_ids"][None])[0].cpu().numpy(), np.asarray(ep["uncertainty_D"]),
                      title=f"{s['tasks'][0]}: plan + retracing (success {bool(ep['success'])})",
                      labels=("real", "imagined (plan's 1st step)"), uncertainty_label="uncertainty of the plan")
    res["seconds"] = time.time() - t_start
    write_json_atomic(root / "mbpo.json", nan_to_none(res))
    write_text_atomic(root / "mbpo.md", "\n".join(md_lines(res)) + "\n")
    report_main(["--scale", scale])
    return res


def main(argv: list[str] | None = None) -> int:
    """Evaluate and report; prints the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="whale plan", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    scale = p.parse_args(argv).scale
    os.environ.setdefault("MUJOCO_GL", "egl")
    t_start = time.time()
    plan, ev = load_plan_yaml(Path("stages") / scale / "plan.yaml")
    res = finish(scale, " ".join(["whale plan", *argv]), plan, ev, evaluate(scale, plan, ev), t_start)
    print("\n".join(table_lines(res)))
    print(f"[plan] wrote runs/{scale}/mbpo.md and mbpo.json in {res['seconds'] / 60:.1f} min")
    return 0
