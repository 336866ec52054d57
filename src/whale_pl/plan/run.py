"""One task's episodes for every method, in a process of its own (the simulator renders there), and the
choice of λ on separate start states."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from whale_pl.plan.config import EvalConfig, PlanConfig


@dataclass
class TaskJob:
    """What one worker runs: a task's start state, the planners' λ, the models and the baselines' inputs."""

    task: str
    seed: int
    lambdas: dict[str, float]  # penalty -> λ for each planner to run ("none" -> 0)
    members: list[str]  # dynamics checkpoints; the first plans
    plan: PlanConfig
    size: int
    camera: str
    decisions: int
    hold: int
    baselines: dict = field(default_factory=dict)  # behavior policy name, BC state (None: skip baselines)
    gif_method: str = ""  # keep the frames of this planner's episode


def _planners(job: TaskJob):
    """The world models of the job and one Planner per penalty."""
    import torch

    from whale_pl.plan.cem import Planner
    from whale_pl.rollout.value import WorldModel

    torch.set_num_threads(1)
    models = [WorldModel.load(c) for c in (job.members if "ensemble" in job.lambdas else job.members[:1])]
    return {pen: Planner(models[0], job.plan, pen, lam, members=models if pen == "ensemble" else (),
                         seed=zlib.crc32(f"{job.task}/{pen}".encode())) for pen, lam in job.lambdas.items()}


def _baseline_acts(job: TaskJob, seed: int) -> dict:
    """Per baseline its ``(act(step, obs), every)``: every simulator step (policies) or per decision (random)."""
    from whale_pl.data.policies import parse_policy
    from whale_pl.plan.baselines import BCPolicy

    b = job.baselines
    pol = parse_policy(b["behavior"])
    pol.reset(job.task, np.random.default_rng(seed))
    bc = BCPolicy(b["bc_tasks"], b["bc_dims"][0], b["bc_dims"][1])
    bc.load_state_dict(b["bc_state"])
    rng = np.random.default_rng(seed)
    return {"behavior": (lambda t, obs: pol.act(obs), 1), "bc": (lambda t, obs: bc.act(job.task, obs), 1),
            "random": (lambda t, obs: rng.uniform(-1, 1, 4).astype(np.float32), job.hold)}


def run_task(job: TaskJob) -> dict:
    """Every method from the job's start state: per method a list of its one episode record."""
    from whale_pl.data.metaworld import MetaWorldEnv
    from whale_pl.plan.evaluate import planned_episode, policy_episode

    os.environ.setdefault("MUJOCO_GL", "egl")
    planners = _planners(job)
    env = MetaWorldEnv(job.task, job.size, job.camera)
    out: dict[str, list] = {}
    try:
        for pen, planner in planners.items():
            ep = planned_episode(planner, env, job.seed, job.decisions, job.hold, f"plan_{pen}" == job.gif_method)
            out[f"plan_{pen}"] = [{"seed": job.seed, **ep}]
        for name, (act, every) in (_baseline_acts(job, job.seed).items() if job.baselines else ()):
            out[name] = [{"seed": job.seed, **policy_episode(env, job.seed, act, job.decisions, job.hold, every)}]
    finally:
        env.close()
    return out


def run_jobs(jobs: list[TaskJob], workers: int, desc: str = "episodes", progress: bool = True) -> list[dict]:
    """Run the jobs in order, ``workers`` processes at once (spawned: each renders on its own)."""
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc=desc, disable=not progress)
    if workers <= 1:
        return [run_task(j) for j in tqdm(jobs, **bar)]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(run_task, jobs), **bar))


def choose_lambdas(ev: EvalConfig, make_job, discount: float, workers: int, progress: bool = True) -> dict:
    """For each penalty, the λ of its grid with the highest mean real (discounted) return on the tuning start
    states (ties: the smaller λ); every grid point's return."""
    from whale_pl.rollout.value import discounted_return

    grid = {pen: sorted(set(v)) for pen, v in ev.lambdas.items()}
    keys = [(pen, lam) for pen, lams in grid.items() for lam in lams]
    jobs = [make_job(pen, lam) for pen, lam in keys]
    results = run_jobs([j for js in jobs for j in js], workers, "choosing lambda", progress)
    per = len(jobs[0]) if jobs else 0
    table: dict[str, dict[float, float]] = {pen: {} for pen in grid}
    for n, (pen, lam) in enumerate(keys):
        eps = [e for r in results[n * per:(n + 1) * per] for e in r[f"plan_{pen}"]]
        table[pen][lam] = float(np.mean([discounted_return(e["rewards_D"], discount) for e in eps]))
    chosen = {pen: max(sorted(t), key=lambda lam: (t[lam], -lam)) for pen, t in table.items()}
    return {"chosen": chosen, "grid": {pen: {str(k): v for k, v in t.items()} for pen, t in table.items()}}
