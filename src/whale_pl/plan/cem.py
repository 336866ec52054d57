"""CEM model-predictive control in imagination (docs/method.md, "Planning in imagination") and its
settings (``stages/<scale>/plan.yaml``, checked with errors that name the key and its value)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from whale_pl.rollout.retracing import ensemble_uncertainty
from whale_pl.rollout.value import WorldModel

PENALTIES = ("none", "retracing", "ensemble")


class PlanConfigError(ValueError):
    """A plan setting out of range: the message names the key and the value."""


def _check(cfg, rules: list[tuple[str, bool, str]]):
    """``cfg``, or PlanConfigError naming the first key whose rule fails, its value and what is expected."""
    for key, ok, want in rules:
        if not ok:
            raise PlanConfigError(f"plan config: {key}={getattr(cfg, key)!r} is invalid, expected {want}")
    return cfg


@dataclass
class PlanConfig:
    """CEM model-predictive control in imagination: N candidates of H decisions, a few refinements."""

    samples: int = 64  # N action sequences per CEM iteration
    horizon: int = 4  # H decisions imagined per candidate (model steps)
    iterations: int = 3  # CEM iterations per decision
    elites: int = 8  # best candidates the next iteration's Gaussian is fitted to
    init_std: float = 0.5  # first iteration's std of the raw actions (in [-1, 1])
    min_std: float = 0.05  # floor of the refitted std
    context: int = 4  # most recent real frames the model sees (the demo model trained with 1-4 clean ones)
    maskgit_steps: int = 0  # MaskGIT steps per imagined frame; 0: the checkpoint's own sampling setting
    discount: float = 0.99  # per decision
    K: int = 3  # retracing anchors per imagined step
    weight: float = 0.5  # uncertainty = w * disagreement + (1 - w) * entropy

    def check(self) -> "PlanConfig":
        """Raise PlanConfigError naming the first bad key and its value (the model's limits: ``Planner``)."""
        return _check(self, [("samples", self.samples >= 2, ">= 2"), ("horizon", self.horizon >= 1, ">= 1"),
                             ("iterations", self.iterations >= 1, ">= 1"),
                             ("elites", 1 <= self.elites <= self.samples, f"in [1, samples={self.samples}]"),
                             ("init_std", self.init_std > 0, "> 0"),
                             ("min_std", 0 <= self.min_std <= self.init_std, f"in [0, init_std={self.init_std}]"),
                             ("context", self.context >= 1, ">= 1"), ("maskgit_steps", self.maskgit_steps >= 0, ">= 0"),
                             ("discount", 0 < self.discount <= 1, "in (0, 1]"), ("K", self.K >= 2, ">= 2"),
                             ("weight", 0 <= self.weight <= 1, "in [0, 1]")])


@dataclass
class EvalConfig:
    """Which start states, how many, which λ values are tried, how many ensemble members."""

    starts: int = 10  # evaluation start states per task
    tune_starts: int = 1  # start states per task for choosing λ (their own seeds)
    seed: int = 40_000  # evaluation start states (the dataset uses its config seed, EvalSet 20_000)
    tune_seed: int = 41_000  # λ-selection start states
    lambdas: dict[str, list[float]] = field(default_factory=lambda: {"retracing": [1.0, 10.0],
                                                                     "ensemble": [1.0, 10.0]})
    members: int = 2  # ensemble members: the experiment's on-models of seeds 0..M-1 (member 0 plans)
    jobs: int = 1  # worker processes (one job per task and start state)

    def check(self) -> "EvalConfig":
        """Raise PlanConfigError naming the first bad key and value."""
        grids_ok = all(pen in PENALTIES[1:] and grid and all(lam >= 0 for lam in grid)
                       for pen, grid in self.lambdas.items())
        return _check(self, [("starts", self.starts >= 1, ">= 1"), ("tune_starts", self.tune_starts >= 1, ">= 1"),
                             ("tune_seed", self.tune_seed != self.seed, f"!= seed={self.seed}"),
                             ("members", self.members >= 2, ">= 2"), ("jobs", self.jobs >= 1, ">= 1"),
                             ("lambdas", grids_ok, f"keys among {PENALTIES[1:]}, each a non-empty list of λ >= 0")])


def _build(cls, d: dict | None, where: str):
    """A dataclass from a YAML mapping, refusing unknown keys by name."""
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise PlanConfigError(f"{where}: unknown key(s) {bad}; known: {sorted(known)}")
    return cls(**d)


def load_plan_yaml(path: str | Path) -> tuple[PlanConfig, EvalConfig]:
    """The ``planner:`` and ``evaluate:`` groups of a plan YAML, checked."""
    import yaml

    d = yaml.safe_load(Path(path).read_text()) or {}
    bad = sorted(set(d) - {"planner", "evaluate"})
    if bad:
        raise PlanConfigError(f"{path}: unknown group(s) {bad}; expected planner and evaluate")
    return (_build(PlanConfig, d.get("planner"), f"{path} planner").check(),
            _build(EvalConfig, d.get("evaluate"), f"{path} evaluate").check())


@dataclass
class History:
    """The real episode so far on the model's clock: token frames and the (one fewer) normalised actions between."""

    ids_Thw: torch.Tensor
    actions_norm_TA: torch.Tensor


def shared_prefix_prior(z_fn, shared: int):
    """The prior of N candidates sharing their first ``shared`` frames: a history within them runs once, broadcast."""
    def prior(ids_BThw: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """z of every frame of the history, [B, T, Z]."""
        if ids_BThw.shape[1] <= shared:
            return z_fn(ids_BThw[:1], actions_BTA[:1]).expand(ids_BThw.shape[0], -1, -1)
        return z_fn(ids_BThw, actions_BTA)
    return prior


class Planner:
    """CEM over raw action sequences scored in imagination, minus ``lam`` x an uncertainty ``penalty``."""

    def __init__(self, wm: WorldModel, cfg: PlanConfig, penalty: str = "none", lam: float = 0.0,
                 members: Sequence[WorldModel] = (), seed: int = 0) -> None:
        self.wm, self.cfg, self.penalty, self.lam, self.members = wm, cfg, penalty, float(lam), list(members)
        F, S = wm.model.max_frames, wm.model.max_stride  # the model's limits (the rest: load_plan_yaml's check)
        _check(cfg, [("horizon", cfg.context + cfg.horizon <= F, f"<= the model's max_frames ({F}) - context "
                      f"({cfg.context}) = {F - cfg.context}: the history and the imagined frames must fit one window"),
                     ("K", penalty != "retracing" or cfg.K <= S, f"<= the model's max_stride ({S})")])
        self.steps = cfg.maskgit_steps or wm.steps
        self.rng = np.random.default_rng(seed)
        self.A = wm.model.action_dim

    def _inputs(self, history: History, actions_raw_NHA: np.ndarray):
        """The last C frames [N, C, h, w], the actions from them on [N, C-1+H, A], the prior, for N candidates."""
        N, C = actions_raw_NHA.shape[0], min(self.cfg.context, history.ids_Thw.shape[0])
        ctx_Chw, hist_TA = history.ids_Thw[-C:], history.actions_norm_TA[history.actions_norm_TA.shape[0] - (C - 1):]
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
