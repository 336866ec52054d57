"""The planner's and the evaluation's settings (``stages/<scale>/plan.yaml``), checked with errors that name
the key and its value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

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

    def check(self, max_frames: int | None = None, max_stride: int | None = None) -> "PlanConfig":
        """Raise PlanConfigError naming the first bad key and its value; with a model's limits, check them too."""
        rules = [("samples", self.samples >= 2, ">= 2"), ("horizon", self.horizon >= 1, ">= 1"),
                 ("iterations", self.iterations >= 1, ">= 1"),
                 ("elites", 1 <= self.elites <= self.samples, f"in [1, samples={self.samples}]"),
                 ("init_std", self.init_std > 0, "> 0"), ("min_std", 0 <= self.min_std <= self.init_std,
                                                           f"in [0, init_std={self.init_std}]"),
                 ("context", self.context >= 1, ">= 1"), ("maskgit_steps", self.maskgit_steps >= 0, ">= 0"),
                 ("discount", 0 < self.discount <= 1, "in (0, 1]"), ("K", self.K >= 2, ">= 2"),
                 ("weight", 0 <= self.weight <= 1, "in [0, 1]")]
        if max_frames is not None:
            rules.append(("horizon", self.context + self.horizon <= max_frames,
                          f"<= the model's max_frames ({max_frames}) - context ({self.context}) = "
                          f"{max_frames - self.context}: the history and the imagined frames must fit one window"))
        if max_stride is not None:
            rules.append(("K", self.K <= max_stride, f"<= the model's max_stride ({max_stride})"))
        return _check(self, rules)


@dataclass
class EvalConfig:
    """Which start states, how many, which λ values are tried, and the models' experiment folder."""

    starts: int = 10  # evaluation start states per task
    tune_starts: int = 1  # start states per task for choosing λ (their own seeds)
    seed: int = 40_000  # evaluation start states (the dataset uses its config seed, EvalSet 20_000)
    tune_seed: int = 41_000  # λ-selection start states
    lambdas: dict[str, list[float]] = field(default_factory=lambda: {"retracing": [1.0, 10.0],
                                                                     "ensemble": [1.0, 10.0]})
    members: int = 2  # ensemble members: the experiment's on-models of seeds 0..M-1 (member 0 plans)
    experiment: str = ""  # runs/<scale>/experiment/<N>_steps; empty: the one with the most on-models
    jobs: int = 1  # worker processes (one job per task and start state)

    def check(self) -> "EvalConfig":
        """Raise PlanConfigError naming the first bad key and value."""
        _check(self, [("starts", self.starts >= 1, ">= 1"), ("tune_starts", self.tune_starts >= 1, ">= 1"),
                      ("tune_seed", self.tune_seed != self.seed, f"!= seed={self.seed}"),
                      ("members", self.members >= 2, ">= 2"), ("jobs", self.jobs >= 1, ">= 1")])
        for pen, grid in self.lambdas.items():
            if pen not in PENALTIES[1:] or not grid:
                raise PlanConfigError(f"plan config: lambdas.{pen}={grid!r}: keys must be {PENALTIES[1:]}, "
                                      "each a non-empty list")
            for lam in grid:
                if not lam >= 0:
                    raise PlanConfigError(f"plan config: lambdas.{pen} holds lambda={lam!r}, expected >= 0")
        return self


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
