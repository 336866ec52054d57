"""CEM model-predictive control in imagination (docs/method.md, "Planning in imagination").

Each decision imagines N candidate sequences of H raw actions from the real history in one batch, scores them
by the reward head's discounted return minus λ times their summed uncertainty, refits a Gaussian to the elites
and finally returns the best sequence seen. z (behavior-conditioned models) is the prior over the real history,
then over the imagined frames with the candidate's actions, causally at each imagined step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from whale_pl.plan.config import PENALTIES, PlanConfig, PlanConfigError
from whale_pl.rollout.ensemble import ensemble_uncertainty
from whale_pl.rollout.value import WorldModel


@dataclass
class History:
    """The real episode so far on the model's clock: token frames ``ids_Thw`` and the normalised held
    actions ``actions_norm_TA`` taken between them (one fewer)."""

    ids_Thw: torch.Tensor
    actions_norm_TA: torch.Tensor

    def last(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``context`` frames [C, h, w] and the C-1 actions between them."""
        C = min(context, self.ids_Thw.shape[0])
        return self.ids_Thw[-C:], self.actions_norm_TA[self.actions_norm_TA.shape[0] - (C - 1):]


def shared_prefix_prior(z_fn, shared: int):
    """The prior for N candidates that share their first ``shared`` frames and actions: a history within
    that prefix is run once (batch 1) and broadcast; a longer one is run per candidate."""
    def prior(ids_BThw: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """z of every frame of the history, [B, T, Z]."""
        if ids_BThw.shape[1] <= shared:
            return z_fn(ids_BThw[:1], actions_BTA[:1]).expand(ids_BThw.shape[0], -1, -1)
        return z_fn(ids_BThw, actions_BTA)
    return prior


class Planner:
    """CEM over raw action sequences scored in imagination, with an uncertainty penalty (none / retracing /
    ensemble) weighted by ``lam``."""

    def __init__(self, wm: WorldModel, cfg: PlanConfig, penalty: str = "none", lam: float = 0.0,
                 members: Sequence[WorldModel] = (), seed: int = 0) -> None:
        if penalty not in PENALTIES:
            raise PlanConfigError(f"penalty={penalty!r} is unknown; expected one of {PENALTIES}")
        if not lam >= 0:
            raise PlanConfigError(f"lambda={lam!r} is invalid for penalty {penalty!r}: expected >= 0")
        if penalty == "ensemble" and len(members) < 2:
            raise PlanConfigError(f"penalty 'ensemble' needs >= 2 members, got {len(members)}")
        self.wm, self.cfg, self.penalty, self.lam, self.members = wm, cfg, penalty, float(lam), list(members)
        cfg.check(wm.model.max_frames, wm.model.max_stride if penalty == "retracing" else None)
        self.steps = cfg.maskgit_steps or wm.steps
        self.rng = np.random.default_rng(seed)
        self.A = wm.model.action_dim

    def _inputs(self, history: History, actions_raw_NHA: np.ndarray):
        """Context ids [N, C, h, w], normalised actions [N, C-1+H, A] and the prior for a batch of candidates."""
        N = actions_raw_NHA.shape[0]
        ctx_Chw, hist_TA = history.last(self.cfg.context)
        cand = torch.as_tensor(self.wm.normaliser.normalise_held(actions_raw_NHA), device=self.wm.device)
        acts = torch.cat([hist_TA.to(cand).expand(N, -1, -1), cand], 1)
        ctx = ctx_Chw.to(self.wm.device).expand(N, -1, -1, -1)
        z = None if self.wm.z_fn is None else shared_prefix_prior(self.wm.z_fn, ctx.shape[1] - 1)
        return ctx, acts, z

    def uncertainty(self, ctx: torch.Tensor, ids_NHhw: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Per imagined step uncertainty [N, H] of the penalty (zeros for ``none``)."""
        N, H = ids_NHhw.shape[:2]
        if self.penalty == "none":
            return torch.zeros(N, H, device=ids_NHhw.device)
        if self.penalty == "retracing":
            return self.wm.step_uncertainty(ctx, ids_NHhw, acts, K=self.cfg.K, weight=self.cfg.weight)["score_BT"]
        ids = torch.cat([ctx, ids_NHhw], 1)
        return ensemble_uncertainty([m.model for m in self.members], ids, acts, first=ctx.shape[1],
                                    codebook_VE=self.wm.codebook_VE, z_fns=[m.z_fn for m in self.members],
                                    weight=self.cfg.weight)["score_BT"]

    @torch.no_grad()
    def score(self, history: History, actions_raw_NHA: np.ndarray) -> dict[str, torch.Tensor]:
        """Imagine N candidates from the history in one batch: ``return_N`` (discounted reward head),
        ``uncertainty_NH``, ``score_N`` = return - λ Σ_h u, ``reward_NH``, ``success_NH``, ``ids_NHhw``."""
        ctx, acts, z = self._inputs(history, np.asarray(actions_raw_NHA, np.float32))
        H = actions_raw_NHA.shape[1]
        out = self.wm.model.imagine(ctx, acts, z, horizon=H, steps=self.steps, temperature=self.wm.temperature,
                                    shared_context=True)  # one history: its keys/values computed once
        reward = out["reward_BT"].float()
        ret = (reward * self.cfg.discount ** torch.arange(H, device=reward.device)).sum(-1)
        u = self.uncertainty(ctx, out["ids_BThw"], acts).float()
        return {"return_N": ret, "uncertainty_NH": u, "score_N": ret - self.lam * u.sum(-1), "reward_NH": reward,
                "success_NH": out["success_BT"].float(), "ids_NHhw": out["ids_BThw"]}

    def plan(self, history: History, init_mean_HA: np.ndarray | None = None) -> dict:
        """CEM: the best-scoring candidate over all iterations (``actions_raw_HA``, its ``score`` row of
        :meth:`score`) and every candidate scored (``candidates``: actions and scores per iteration)."""
        c = self.cfg
        mean = np.zeros((c.horizon, self.A)) if init_mean_HA is None else np.asarray(init_mean_HA, np.float64)
        std = np.full_like(mean, c.init_std)
        best, seen = None, []
        for _ in range(c.iterations):
            cand = np.clip(mean + std * self.rng.standard_normal((c.samples, *mean.shape)), -1, 1).astype(np.float32)
            s = self.score(history, cand)
            seen.append((cand, s["score_N"].cpu().numpy()))
            i = int(torch.argmax(s["score_N"]))
            if best is None or float(s["score_N"][i]) > best[1]["score"]:
                best = (cand[i], {k: v[i] for k, v in s.items()} | {"score": float(s["score_N"][i])})
            elite = cand[np.argsort(-seen[-1][1], kind="stable")[: c.elites]]
            mean, std = elite.mean(0), np.maximum(elite.std(0), c.min_std)
        return {"actions_raw_HA": best[0], "best": best[1], "candidates": seen}
