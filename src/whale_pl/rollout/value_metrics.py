"""Figures of merit for value estimation and uncertainty quality (docs/method.md, "Evaluation").

Real returns ``V_i`` of a set of policies (simulator) against the returns ``V̂_i`` the world model
imagines for them: value gap ``mean_i |V_i − V̂_i| / range(V)`` (both min–max normalised by the real
range), Spearman / Pearson over the policies, and regret@1 ``(max V − V[argmax V̂]) / range(V)``.
A per-step uncertainty ``u`` against the true per-step error ``e``: Spearman, and the AUROC of ``u``
as a detector of "bad" steps (error above a threshold, by default the median).
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
    v, v_hat = _as_1d("real returns", real), _as_1d("imagined returns", imagined)
    if v.shape != v_hat.shape:
        raise ValueError(f"real returns {v.shape} and imagined returns {v_hat.shape} differ in length")
    if len(v) < need:
        raise ValueError(f"need at least {need} policies, got {len(v)}")
    return v, v_hat


def _real_range(v: np.ndarray) -> float:
    if v.max() <= v.min():
        raise ValueError(f"real returns have zero range (all {v[0]:.6g}): min-max normalisation is undefined; "
                         "evaluate policies whose returns differ")
    return float(v.max() - v.min())


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    return float("nan") if np.ptp(a) == 0 or np.ptp(b) == 0 else float(fn(a, b)[0])  # undefined for a constant


def value_gap(real: ArrayLike, imagined: ArrayLike) -> float:
    """Mean absolute difference of real and imagined returns, both min–max normalised by the real range."""
    v, v_hat = _pair(real, imagined)
    lo, rng = float(v.min()), _real_range(v)
    return float(np.mean(np.abs((v - lo) / rng - (v_hat - lo) / rng)))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (ties get average ranks); NaN if either side is constant."""
    return _corr(stats.spearmanr, *_pair(x, y))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; NaN if either side is constant."""
    return _corr(stats.pearsonr, *_pair(x, y))


def regret_at_1(real: ArrayLike, imagined: ArrayLike) -> float:
    """Normalised real value lost by picking the policy the model ranks first (the first of tied ones)."""
    v, v_hat = _pair(real, imagined)
    return float((v.max() - v[int(np.argmax(v_hat))]) / _real_range(v))


def value_figures(real: ArrayLike, imagined: ArrayLike) -> dict[str, float]:
    """All value-estimation figures at once: value_gap, spearman, pearson, regret_at_1."""
    return {f.__name__: f(real, imagined) for f in (value_gap, spearman, pearson, regret_at_1)}


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann–Whitney U, average ranks for
    ties); NaN when only one class is present."""
    s = _as_1d("scores", scores)
    y = np.asarray(labels).astype(bool)
    if y.shape != s.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((stats.rankdata(s)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uncertainty_quality(uncertainty: ArrayLike, error: ArrayLike, threshold: float | None = None) -> dict[str, float]:
    """How well a per-step uncertainty tracks the true per-step error: ``spearman``, ``pearson``, ``auroc``
    (bad step = error > ``threshold``, by default the median error), the ``threshold`` and the steps ``n``."""
    u, e = _pair(uncertainty, error, need=3)
    thr = float(np.median(e)) if threshold is None else float(threshold)
    return {"spearman": _corr(stats.spearmanr, u, e), "pearson": _corr(stats.pearsonr, u, e),
            "auroc": auroc(u, e > thr), "threshold": thr, "n": int(len(u))}


def nan_to_none(d: dict) -> dict:
    """JSON has no NaN: replace NaN/inf floats (recursively through dicts) with None."""
    return {k: nan_to_none(v) if isinstance(v, dict) else None if isinstance(v, float) and not math.isfinite(v)
            else v for k, v in d.items()}
