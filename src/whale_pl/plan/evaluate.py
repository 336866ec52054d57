"""Episodes in the real simulator: the planner (one decision per model step, each held ``hold`` simulator
steps) and the baselines, from start states whose seeds are disjoint from the dataset's episode seeds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from whale_pl.plan.cem import History, Planner


def policy_episode(env, seed: int, act: Callable[[int, np.ndarray], np.ndarray], decisions: int, hold: int,
                   every: int = 1) -> dict:
    """A policy acting every ``every`` simulator steps (1: each step; ``hold``: once per decision) for
    ``decisions * hold`` steps; ``rewards_D`` summed per decision, ``success`` any step's."""
    obs, rewards, success = env.reset(seed), np.zeros(decisions), False
    for d in range(decisions):
        for j in range(0, hold, every):
            obs, r, s = env.step_held(act(d * hold + j, obs), min(every, hold - j))
            rewards[d] += r
            success = success or any(s)
    return {"rewards_D": rewards, "success": success}


def planned_episode(planner: Planner, env, seed: int, decisions: int, hold: int, keep_frames: bool = False) -> dict:
    """The planner in the real simulator: each decision imagines from the real history, executes the first
    action of the best plan for ``hold`` steps. Also what the model believed of each executed action:
    ``imagined_rewards_D`` / ``imagined_success_D`` (first imagined step of the chosen plan) and its
    ``uncertainty_D``; with ``keep_frames`` the real frames and the imagined first frames (token ids)."""
    wm = planner.wm
    env.reset(seed)
    frame = env.render()
    ids = [wm.tokenize(frame[None, None])[0, 0]]
    acts: list[torch.Tensor] = []
    out = {k: np.zeros(decisions) for k in ("rewards_D", "imagined_rewards_D", "imagined_success_D", "uncertainty_D")}
    out["success"], frames, imagined, mean = False, [frame], [], None
    for d in range(decisions):
        hist = History(torch.stack(ids), torch.stack(acts) if acts else torch.zeros(0, wm.model.action_dim))
        p = planner.plan(hist, mean)
        a = p["actions_raw_HA"][0]
        _, r, s = env.step_held(a, hold)
        out["rewards_D"][d], out["success"] = r, out["success"] or any(s)
        for k, v in (("imagined_rewards_D", "reward_NH"), ("imagined_success_D", "success_NH"),
                     ("uncertainty_D", "uncertainty_NH")):
            out[k][d] = float(p["best"][v][0])
        frame = env.render()
        ids.append(wm.tokenize(frame[None, None])[0, 0])
        acts.append(torch.as_tensor(wm.normaliser.normalise_held(a), device=wm.device))
        mean = np.concatenate([p["actions_raw_HA"][1:], np.zeros_like(p["actions_raw_HA"][:1])])  # warm start
        if keep_frames:
            frames.append(frame)
            imagined.append(p["best"]["ids_NHhw"][0])
    if keep_frames:
        out["frames"], out["imagined_ids"] = np.stack(frames), torch.stack(imagined)
    return out


def dataset_seeds(data_config) -> set[int]:
    """Every episode seed of a Meta-World dataset config (train, val and OOD episodes)."""
    from whale_pl.data.metaworld import make_jobs

    return {j.seed for j in make_jobs(data_config)}


def check_disjoint(seeds: list[int], data_config) -> None:
    """Refuse start seeds that name one of the dataset's episodes."""
    both = sorted(set(seeds) & dataset_seeds(data_config))
    if both:
        raise ValueError(f"start seeds {both} are episode seeds of the dataset: pick another seed base")
