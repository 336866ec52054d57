"""Baselines on the planner's start states, from the offline data only: the dataset's best behavior policy
per task (by its mean return over the training episodes), behavior cloning (a small MLP on the proprio state
and the task, trained on the training shards) and uniformly random actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def training_episodes(data_dir: str | Path) -> list[dict]:
    """Task, policy, state [T, S], actions [T, A] and return of every training-split episode of a dataset."""
    from whale_pl.data.shards import iter_episodes

    out = [{"task": ep.meta["task"], "policy": ep.meta["policy"]["name"], "seed": int(ep.meta["seed"]),
            "state": np.asarray(ep.state, np.float32), "actions": np.asarray(ep.actions, np.float32),
            "return": float(np.sum(ep.rewards))} for ep in iter_episodes(data_dir, ["train"], verify=False)]
    if not out:
        raise ValueError(f"{data_dir}: no training episodes")
    return out


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
