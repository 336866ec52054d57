"""Episodes in the real simulator from start states disjoint from the dataset's episode seeds: the planner (one
decision per model step, held ``hold`` simulator steps) and the baselines (best behavior policy in the data,
behavior cloning, random actions), one process per task and start state; the choice of λ."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from whale_pl.plan.cem import EvalConfig, History, PlanConfig, Planner
from whale_pl.rollout.value import WorldModel, discounted_return


def policy_episode(env, seed: int, act: Callable[[int, np.ndarray], np.ndarray], decisions: int, hold: int,
                   every: int = 1) -> dict:
    """A policy acting every ``every`` of ``decisions * hold`` steps: rewards summed per decision, any success."""
    obs, rewards, success = env.reset(seed), np.zeros(decisions), False
    for d in range(decisions):
        for j in range(0, hold, every):
            obs, r, s = env.step_held(act(d * hold + j, obs), min(every, hold - j))
            rewards[d] += r
            success = success or any(s)
    return {"rewards_D": rewards, "success": success}


def planned_episode(planner: Planner, env, seed: int, decisions: int, hold: int, keep_frames: bool = False) -> dict:
    """``policy_episode`` of the planner with what the model believed (each chosen plan's first imagined step)."""
    wm = planner.wm
    ids, acts, frames, imagined, mean = [], [], [], [], None
    believed = {"imagined_rewards_D": [], "imagined_success_D": [], "uncertainty_D": []}

    def act(t: int, obs: np.ndarray) -> np.ndarray:
        """Plan from the real frames so far (the newest rendered now) and the actions between them."""
        nonlocal mean
        frames.append(env.render())
        ids.append(wm.tokenize(frames[-1][None, None])[0, 0])
        p = planner.plan(History(torch.stack(ids), torch.stack(acts) if acts else torch.zeros(0, wm.model.action_dim)),
                         mean)
        for k, v in zip(believed, ("reward_NH", "success_NH", "uncertainty_NH")):
            believed[k].append(float(p["best"][v][0]))
        imagined.append(p["best"]["ids_NHhw"][0])
        a = p["actions_raw_HA"][0]
        acts.append(torch.as_tensor(wm.normaliser.normalise_held(a), device=wm.device))
        mean = np.concatenate([p["actions_raw_HA"][1:], np.zeros_like(p["actions_raw_HA"][:1])])  # warm start
        return a

    out = policy_episode(env, seed, act, decisions, hold, every=hold) | {k: np.array(v) for k, v in believed.items()}
    if keep_frames:
        out["frames"], out["imagined_ids"] = np.stack([*frames, env.render()]), torch.stack(imagined)
    return out


def check_disjoint(seeds: list[int], data_config) -> None:
    """Refuse start seeds that name one of the dataset's episodes (train, val or OOD)."""
    from whale_pl.data.metaworld import make_jobs

    both = sorted(set(seeds) & {j.seed for j in make_jobs(data_config)})
    if both:
        raise ValueError(f"start seeds {both} are episode seeds of the dataset: pick another seed base")


def training_episodes(data_dir: str | Path) -> list[dict]:
    """Task, policy, state [T, S], actions [T, A] and return of every training-split episode of a dataset."""
    from whale_pl.data.shards import iter_episodes

    return [{"task": ep.meta["task"], "policy": ep.meta["policy"]["name"], "seed": int(ep.meta["seed"]),
             "state": np.asarray(ep.state, np.float32), "actions": np.asarray(ep.actions, np.float32),
             "return": float(np.sum(ep.rewards))} for ep in iter_episodes(data_dir, ["train"], verify=False)]


def best_policies(episodes: list[dict]) -> dict[str, dict]:
    """Per task, the behavior policy with the highest mean return in the data, with every policy's mean."""
    out = {}
    for task in sorted({e["task"] for e in episodes}):
        means: dict[str, list[float]] = {}
        for e in (e for e in episodes if e["task"] == task):
            means.setdefault(e["policy"], []).append(e["return"])
        avg = {p: float(np.mean(v)) for p, v in means.items()}
        out[task] = {"policy": max(sorted(avg), key=avg.get), "mean_returns": avg}
    return out


class BCPolicy(nn.Module):
    """Behavior cloning: an MLP from (proprio state, task one-hot) to the recorded action."""

    def __init__(self, tasks: list[str], state_dim: int, action_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.net = nn.Sequential(nn.Linear(state_dim + len(tasks), hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, action_dim), nn.Tanh())
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("std", torch.ones(state_dim))

    def inputs(self, task: str, state_BS: torch.Tensor) -> torch.Tensor:
        """Standardised state with the task's one-hot appended."""
        onehot = torch.zeros(state_BS.shape[0], len(self.tasks))
        onehot[:, self.tasks.index(task)] = 1
        return torch.cat([(state_BS - self.mean) / self.std, onehot], -1)

    @torch.no_grad()
    def act(self, task: str, state_S: np.ndarray) -> np.ndarray:
        """The cloned action for one state, float32 [A] in [-1, 1]."""
        x = self.inputs(task, torch.as_tensor(np.asarray(state_S, np.float32))[None])
        return self.net(x)[0].numpy().astype(np.float32)


def train_bc(episodes: list[dict], steps: int = 2000, batch: int = 256, lr: float = 1e-3, seed: int = 0) -> BCPolicy:
    """Fit :class:`BCPolicy` by mean squared error on every (state, action) pair of the episodes."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tasks = sorted({e["task"] for e in episodes})
    S = torch.as_tensor(np.concatenate([e["state"] for e in episodes]))
    A = torch.as_tensor(np.clip(np.concatenate([e["actions"] for e in episodes]), -1, 1))
    pol = BCPolicy(tasks, S.shape[1], A.shape[1])
    pol.mean.copy_(S.mean(0))
    pol.std.copy_(S.std(0).clamp_min(1e-3))
    x = torch.cat([pol.inputs(e["task"], torch.as_tensor(e["state"])) for e in episodes])
    opt = torch.optim.Adam(pol.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.mse_loss(pol.net(x[i]), A[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pol.eval()


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
    baselines: dict = field(default_factory=dict)  # behavior policy name, the BCPolicy (empty: no baselines)
    gif_method: str = ""  # keep the frames of this planner's episode


def run_task(job: TaskJob) -> dict:
    """Every method from the job's start state: per method a list of its one episode record."""
    from whale_pl.data.metaworld import MetaWorldEnv
    from whale_pl.data.policies import parse_policy

    baselines = {}  # name -> (act(step, obs), every): the policies act every simulator step, random per decision
    if job.baselines:
        pol, bc, rng = parse_policy(job.baselines["behavior"]), job.baselines["bc"], np.random.default_rng(job.seed)
        pol.reset(job.task, np.random.default_rng(job.seed))
        baselines = {"behavior": (lambda t, obs: pol.act(obs), 1), "bc": (lambda t, obs: bc.act(job.task, obs), 1),
                     "random": (lambda t, obs: rng.uniform(-1, 1, 4).astype(np.float32), job.hold)}
    torch.set_num_threads(1)
    models = [WorldModel.load(c) for c in (job.members if "ensemble" in job.lambdas else job.members[:1])]
    env = MetaWorldEnv(job.task, job.size, job.camera)
    out: dict[str, list] = {}
    try:
        for pen, lam in job.lambdas.items():
            planner = Planner(models[0], job.plan, pen, lam, members=models if pen == "ensemble" else (),
                              seed=zlib.crc32(f"{job.task}/{pen}".encode()))
            ep = planned_episode(planner, env, job.seed, job.decisions, job.hold, f"plan_{pen}" == job.gif_method)
            out[f"plan_{pen}"] = [{"seed": job.seed, **ep}]
        for name, (act, every) in baselines.items():
            out[name] = [{"seed": job.seed, **policy_episode(env, job.seed, act, job.decisions, job.hold, every)}]
    finally:
        env.close()
    return out


def run_jobs(jobs: list[TaskJob], workers: int, desc: str) -> list[dict]:
    """Run the jobs in order, ``workers`` processes at once (spawned: each renders on its own)."""
    import multiprocessing as mp

    from tqdm import tqdm

    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(run_task, jobs), total=len(jobs), desc=desc))


def choose_lambdas(ev: EvalConfig, make_job, discount: float) -> dict:
    """Per penalty the λ of its grid with the highest mean real return on the tuning starts (ties: the smaller)."""
    grid = {pen: sorted(set(v)) for pen, v in ev.lambdas.items()}
    keys = [(pen, lam) for pen, lams in grid.items() for lam in lams]
    jobs = [make_job(pen, lam) for pen, lam in keys]
    results = run_jobs([j for js in jobs for j in js], ev.jobs, "choosing lambda")
    per = len(jobs[0]) if jobs else 0
    table: dict[str, dict[float, float]] = {pen: {} for pen in grid}
    for n, (pen, lam) in enumerate(keys):
        eps = [e for r in results[n * per:(n + 1) * per] for e in r[f"plan_{pen}"]]
        table[pen][lam] = float(np.mean([discounted_return(e["rewards_D"], discount) for e in eps]))
    chosen = {pen: max(sorted(t), key=lambda lam: (t[lam], -lam)) for pen, t in table.items()}
    return {"chosen": chosen, "grid": {pen: {str(k): v for k, v in t.items()} for pen, t in table.items()}}
