"""``whale plan`` / ``python -m whale_pl.plan`` / ``make mbpo``: control Meta-World by CEM model-predictive
control in a trained world model, from the offline dataset only, and judge it in the real simulator.

    whale plan [--scale demo] [--config stages/<scale>/plan.yaml] [--starts N] [--jobs J]

Uses the experiment's behavior-conditioned models (``runs/<scale>/experiment/<N>_steps/on/<seed>/DONE``:
seed 0 plans, seeds 0..M-1 form the ensemble), chooses λ of each penalty on separate start states, runs
every planner and baseline from the same evaluation start states, and writes ``runs/<scale>/mbpo.json``,
``mbpo.md``, ``mbpo_success.png``, ``mbpo_episode.gif``, then rebuilds ``runs/<scale>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from whale_pl.plan.config import EvalConfig, PlanConfig, load_plan_yaml
from whale_pl.plan.run import TaskJob, choose_lambdas, run_jobs


def experiment_members(scale: str, ev: EvalConfig, runs: Path = Path("runs")) -> list[str]:
    """The on-models' checkpoints (seeds 0..M-1) of the experiment folder (``evaluate.experiment``, else the
    ``<N>_steps`` folder with the most finished on-models)."""
    if ev.experiment:
        groups = [Path(ev.experiment)]
    else:
        groups = sorted((runs / scale / "experiment").glob("*_steps"),
                        key=lambda g: (len(list(g.glob("on/*/DONE"))), g.name))[-1:]
    for g in groups:
        done = sorted(g.glob("on/*/DONE"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 1 << 30)
        if len(done) >= ev.members:
            return [json.loads(p.read_text())["ckpt"] for p in done[: ev.members]]
    raise SystemExit(f"[plan] need {ev.members} finished on-models under {groups or runs / scale / 'experiment'}: "
                     f"run `make experiment SCALE={scale}` (or `python -m whale_pl.experiment --scale {scale} "
                     f"--train-only --members {ev.members}`)")


def _setting(a: argparse.Namespace, ev: EvalConfig, members: list[str]) -> dict:
    """Everything the jobs share: tasks, start states (refused where they are dataset episodes), clock,
    baselines (best policy per task, behavior cloning)."""
    from whale_pl.data.metaworld import CollectConfig
    from whale_pl.plan.baselines import best_policies, train_bc, training_episodes
    from whale_pl.plan.evaluate import check_disjoint
    from whale_pl.rollout.value import frame_stride_of, start_seeds

    c = CollectConfig.from_yaml(a.data_config)
    seeds = {k: {t: start_seeds(base, t, n) for t in c.tasks}
             for k, base, n in (("tune", ev.tune_seed, ev.tune_starts), ("eval", ev.seed, ev.starts))}
    check_disjoint([x for v in seeds.values() for xs in v.values() for x in xs], c)
    stride = frame_stride_of(members[0])
    eps = training_episodes(c.out)
    bc = train_bc(eps)
    base = {"bc_state": bc.state_dict(), "bc_tasks": bc.tasks, "bc_dims": (eps[0]["state"].shape[1],
                                                                            eps[0]["actions"].shape[1])}
    return {"tasks": list(c.tasks), "size": c.size, "camera": c.camera, "decisions": c.max_steps // stride,
            "hold": c.action_repeat * stride, "best": best_policies(eps), "bc": base, "seeds": seeds}


def _jobs(s: dict, plan: PlanConfig, members: list[str], lambdas: dict, seeds: dict[str, list[int]],
          baselines: bool, gif: str = "") -> list[TaskJob]:
    """One job per task and start state (so the workers stay busy to the end)."""
    return [TaskJob(t, seed, lambdas, members, plan, s["size"], s["camera"], s["decisions"], s["hold"],
                    {**s["bc"], "behavior": s["best"][t]["policy"]} if baselines else {},
                    gif if (i, j) == (0, 0) else "")
            for i, t in enumerate(s["tasks"]) for j, seed in enumerate(seeds[t])]


def evaluate(a: argparse.Namespace, plan: PlanConfig, ev: EvalConfig) -> dict:
    """Choose λ, then run every method from the evaluation start states; the raw episodes per task."""
    members = experiment_members(a.scale, ev)
    s = _setting(a, ev, members)
    print(f"[plan] {len(s['tasks'])} tasks, {s['decisions']} decisions x {s['hold']} steps; members {members}; "
          f"best behavior policies {({t: v['policy'] for t, v in s['best'].items()})}", flush=True)
    t0 = time.time()
    lams = choose_lambdas(ev, lambda pen, lam: _jobs(s, plan, members, {pen: lam}, s["seeds"]["tune"], False),
                          plan.discount, ev.jobs, not a.no_progress)
    print(f"[plan] lambda chosen in {time.time() - t0:.0f} s: {lams}", flush=True)
    lambdas = {"none": 0.0, **{pen: lams["chosen"][pen] for pen in ("retracing", "ensemble")}}
    jobs = _jobs(s, plan, members, lambdas, s["seeds"]["eval"], True, gif="plan_retracing")
    per_task: dict[str, dict[str, list]] = {}  # task -> method -> episodes, in start order
    for job, res in zip(jobs, run_jobs(jobs, ev.jobs, "evaluation", not a.no_progress)):
        for method, eps in res.items():
            per_task.setdefault(job.task, {}).setdefault(method, []).extend(eps)
    return {"per_task": per_task, "setting": s, "members": members, "lambdas": lams}


def finish(a: argparse.Namespace, plan: PlanConfig, ev: EvalConfig, out: dict, t_start: float) -> dict:
    """Summaries, plot, GIF, ``mbpo.json`` / ``mbpo.md`` and the rebuilt ``report.md``."""
    from whale_pl.io import write_json_atomic, write_text_atomic
    from whale_pl.plan.report import md_lines, plot_success, write_gif
    from whale_pl.plan.summary import summarise
    from whale_pl.report import main as report_main
    from whale_pl.rollout.value import WorldModel
    from whale_pl.rollout.value_metrics import nan_to_none

    root, s = Path("runs") / a.scale, out["setting"]
    ep = next((e for r in out["per_task"].values() for e in r.get("plan_retracing", []) if "frames" in e), None)
    wm = WorldModel.load(out["members"][0])
    res = {"scale": a.scale, "command": " ".join(["whale plan", *a.argv]), "plan": asdict(plan),
           "evaluate": asdict(ev), "members": out["members"], "lambdas": out["lambdas"],
           "maskgit_steps": plan.maskgit_steps or wm.steps, "decisions": s["decisions"], "hold": s["hold"],
           "best_behavior": s["best"], "summary": summarise(out["per_task"], plan.discount),
           "plot": str(root / "mbpo_success.png")}
    plot_success(res, Path(res["plot"]))
    if ep is not None:
        res["gif"], res["gif_caption"] = str(root / "mbpo_episode.gif"), f"{s['tasks'][0]}, retracing penalty"
        write_gif(wm, ep, Path(res["gif"]), f"{s['tasks'][0]}: plan + retracing (success {bool(ep['success'])})")
    res["seconds"] = time.time() - t_start
    write_json_atomic(root / "mbpo.json", nan_to_none(res))
    write_text_atomic(root / "mbpo.md", "\n".join(md_lines(res)) + "\n")
    report_main(["--scale", a.scale])
    return res


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="whale plan", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    p.add_argument("--config", default=None, help="default stages/<scale>/plan.yaml")
    p.add_argument("--data-config", default=None, help="default stages/<scale>/data.yaml")
    p.add_argument("--starts", type=int, default=None, help="evaluation start states per task (overrides the YAML)")
    p.add_argument("--tune-starts", type=int, default=None, help="λ-selection start states per task")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (one job per task and start state)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(argv)
    a.config = a.config or str(Path("stages") / a.scale / "plan.yaml")
    a.data_config = a.data_config or str(Path("stages") / a.scale / "data.yaml")
    return a


def main(argv: list[str] | None = None) -> int:
    """Evaluate and report; prints the table."""
    from whale_pl.plan.report import table_lines

    os.environ.setdefault("MUJOCO_GL", "egl")
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    plan, ev = load_plan_yaml(a.config)
    over = {k: v for k, v in (("starts", a.starts), ("tune_starts", a.tune_starts), ("jobs", a.jobs)) if v}
    ev = replace(ev, **over).check()
    res = finish(a, plan, ev, evaluate(a, plan, ev), t_start)
    print("\n".join(table_lines(res)))
    print(f"[plan] wrote runs/{a.scale}/mbpo.md and mbpo.json in {res['seconds'] / 60:.1f} min")
    return 0
