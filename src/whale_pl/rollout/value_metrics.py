"""Figures of merit for value estimation and uncertainty quality (docs/method.md, "Evaluation").

Real returns ``V_i`` of a set of policies (simulator) against the returns ``V̂_i`` the world model
imagines for them, over the policies (the last axis; leading axes are batches): value gap
``mean_i |V̂_i − V_i| / R``, signed bias ``mean_i (V̂_i − V_i) / R``, Spearman and Pearson, and
regret@1 ``(max V − V[argmax V̂]) / R``, where R is the real return range (of these policies, or
given). A figure is NaN where it is undefined (equal real returns; a constant side for a correlation;
regret@1 of a single policy). AUROC of a score as a detector of labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray
FIGURES = ("value_gap", "bias", "spearman", "pearson", "regret_at_1")


def _pair(real: ArrayLike, imagined: ArrayLike, need: int = 2) -> tuple[np.ndarray, np.ndarray]:
    v, v_hat = (np.asarray(x, dtype=np.float64) for x in (real, imagined))
    for name, arr in (("real returns", v), ("imagined returns", v_hat)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries: {arr.tolist()}")
    if v.shape != v_hat.shape:
        raise ValueError(f"real returns {v.shape} and imagined returns {v_hat.shape} differ in length")
    if len(v) < need:
        raise ValueError(f"need at least {need} policies, got {len(v)}")
    return v, v_hat


def corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation over the last axis (batched); NaN where either side is constant."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    dx, dy = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dx * dy).sum(-1) / np.sqrt((dx * dx).sum(-1) * (dy * dy).sum(-1))
    return np.where((np.ptp(x, -1) > 0) & (np.ptp(y, -1) > 0), np.clip(r, -1, 1), np.nan)


def rank_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation over the last axis (ties get average ranks); NaN for a constant side."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return corr(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def policy_figures(real_P: np.ndarray, imag_P: np.ndarray, scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every value figure (``FIGURES``) over the last axis, batched over leading axes; ``scale`` (broadcast
    over the leading axes) replaces the real range as the normaliser."""
    real, imag = np.broadcast_arrays(np.asarray(real_P, np.float64), np.asarray(imag_P, np.float64))
    rng = np.broadcast_to(np.ptp(real, axis=-1) if scale is None else np.asarray(scale, np.float64), real.shape[:-1])
    rng = np.where(rng > 0, rng, np.nan)
    err = (imag - real) / rng[..., None]
    picked = np.take_along_axis(real, imag.argmax(-1)[..., None], -1)[..., 0]
    regret = (real.max(-1) - picked) / rng if real.shape[-1] > 1 else rng * np.nan  # one policy: nothing to pick
    return {"value_gap": np.abs(err).mean(-1), "bias": err.mean(-1), "spearman": rank_corr(real, imag),
            "pearson": corr(real, imag), "regret_at_1": regret}


def value_figures(real: ArrayLike, imagined: ArrayLike) -> dict[str, float]:
    """All value figures of one set of policies; refuses equal real returns (no range to normalise by)."""
    v, v_hat = _pair(real, imagined)
    if v.max() <= v.min():
        raise ValueError(f"real returns have zero range (all {v[0]:.6g}): min-max normalisation is undefined; "
                         "evaluate policies whose returns differ")
    return {k: float(x) for k, x in policy_figures(v, v_hat).items()}


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation of two 1-D sequences (ties get average ranks); NaN if either is constant."""
    return float(rank_corr(*_pair(x, y)))


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of ``scores`` for binary ``labels`` over the last axis (Mann–Whitney U,
    average ranks for ties), batched; NaN where only one class is present."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if y.shape != s.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = y.sum(-1), (~y).sum(-1)
    u = (stats.rankdata(s, axis=-1) * y).sum(-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def nan_to_none(d):
    """JSON has no NaN: replace NaN/inf floats (recursively through dicts and lists) with None."""
    if isinstance(d, dict):
        return {k: nan_to_none(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [nan_to_none(v) for v in d]
    return None if isinstance(d, float) and not math.isfinite(d) else d
