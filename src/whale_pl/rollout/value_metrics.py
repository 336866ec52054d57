"""Figures of merit for value estimation and uncertainty quality (docs/method.md, "Evaluation").

Value estimation compares the real returns ``V_i`` of a set of policies (from the simulator) with
the returns ``V̂_i`` the world model imagines for them (same start states, horizon, discount):

- value gap: ``mean_i |Ṽ_i − V̂'_i|`` where both are min–max normalised by the *real* values'
  range, ``x' = (x − min V) / (max V − min V)`` — so it equals ``mean_i |V_i − V̂_i| / range(V)``;
- return correlation: Spearman (rank) and Pearson between V and V̂ over the policies;
- regret@1: ``(max V − V[argmax V̂]) / (max V − min V)`` — the real value lost by trusting the
  model's favourite policy, normalised the same way.

Uncertainty quality compares a per-step uncertainty ``u`` with the true per-step error ``e``:
Spearman(u, e), and the AUROC of ``u`` as a detector of "bad" steps, a step being bad when its
error exceeds a threshold (our choice: the median error unless a threshold is given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray


def _as_1d(name: str, x: ArrayLike) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries: {arr.tolist()}")
    return arr


def _pair(real: ArrayLike, imagined: ArrayLike, need: int = 2) -> tuple[np.ndarray, np.ndarray]:
    v = _as_1d("real returns", real)
    v_hat = _as_1d("imagined returns", imagined)
    if v.shape != v_hat.shape:
        raise ValueError(f"real returns {v.shape} and imagined returns {v_hat.shape} differ in length")
    if len(v) < need:
        raise ValueError(f"need at least {need} policies, got {len(v)}")
    return v, v_hat


def _real_range(v: np.ndarray) -> float:
    rng = float(v.max() - v.min())
    if rng <= 0:
        raise ValueError(
            f"real returns have zero range (all {v[0]:.6g}): min-max normalisation is undefined; "
            "evaluate policies whose returns differ"
        )
    return rng


def value_gap(real: ArrayLike, imagined: ArrayLike) -> float:
    """Mean absolute difference of min–max normalised real and imagined returns (normalised by the
    real returns' range)."""
    v, v_hat = _pair(real, imagined)
    lo, rng = float(v.min()), _real_range(v)
    return float(np.mean(np.abs((v - lo) / rng - (v_hat - lo) / rng)))


def _corr(fn, v: np.ndarray, v_hat: np.ndarray) -> float:
    if np.ptp(v) == 0 or np.ptp(v_hat) == 0:
        return float("nan")  # correlation with a constant is undefined
    return float(fn(v, v_hat)[0])


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (ties get average ranks); NaN if either side is constant."""
    a, b = _pair(x, y)
    return _corr(stats.spearmanr, a, b)


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; NaN if either side is constant."""
    a, b = _pair(x, y)
    return _corr(stats.pearsonr, a, b)


def regret_at_1(real: ArrayLike, imagined: ArrayLike) -> float:
    """Normalised real value lost by picking the policy the model ranks first (ties in the model's
    ranking: the first such policy in the given order)."""
    v, v_hat = _pair(real, imagined)
    return float((v.max() - v[int(np.argmax(v_hat))]) / _real_range(v))


def value_figures(real: ArrayLike, imagined: ArrayLike) -> dict[str, float]:
    """All value-estimation figures at once: value_gap, spearman, pearson, regret_at_1."""
    return {
        "value_gap": value_gap(real, imagined),
        "spearman": spearman(real, imagined),
        "pearson": pearson(real, imagined),
        "regret_at_1": regret_at_1(real, imagined),
    }


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann–Whitney U with average
    ranks for ties). NaN when only one class is present."""
    s = _as_1d("scores", scores)
    y = np.asarray(labels).astype(bool)
    if y.shape != s.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def uncertainty_quality(
    uncertainty: ArrayLike, error: ArrayLike, threshold: float | None = None
) -> dict[str, float]:
    """How well a per-step uncertainty tracks the true per-step error.

    Returns ``spearman``, ``pearson``, ``auroc`` (bad step = error > threshold; default threshold
    the median error), the ``threshold`` used and the number of steps ``n``.
    """
    u, e = _pair(uncertainty, error, need=3)
    thr = float(np.median(e)) if threshold is None else float(threshold)
    return {
        "spearman": _corr(stats.spearmanr, u, e),
        "pearson": _corr(stats.pearsonr, u, e),
        "auroc": auroc(u, e > thr),
        "threshold": thr,
        "n": int(len(u)),
    }


def nan_to_none(d: dict) -> dict:
    """JSON has no NaN: replace NaN/inf floats (recursively) with None."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = nan_to_none(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out
