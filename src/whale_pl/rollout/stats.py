"""Bootstrap intervals and verdicts of the headline experiment (docs/method.md, "Value evaluation", Intervals)."""

from __future__ import annotations

import warnings

import numpy as np

from whale_pl.rollout.value_metrics import auroc, policy_figures, rank_corr

LEVEL, N_BOOT = 0.95, 2000


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN slice is NaN: undefined, said by the verdicts
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval of bootstrap replicates; [nan, nan] when under half of them are defined."""
    s = np.asarray(samples, dtype=np.float64)
    ok = s[np.isfinite(s)]
    if ok.size < max(1, s.size / 2):
        return [float("nan")] * 2
    return [float(q) for q in np.percentile(ok, [50 * (1 - level), 50 * (1 + level)])]


def verdict(x: float, lo: float, hi: float, above: str, below: str, ref: float = 0.0,
            neither: str = "not distinguishable at this scale") -> str:
    """Where an interval lies against ``ref``: ``above`` / ``below`` it, else ``neither``; undefined with a NaN."""
    if not np.isfinite([x, lo, hi]).all():
        return "undefined"
    return above if lo > ref else below if hi < ref else neither


def fmt(x: float | None, nd: int = 3) -> str:
    """A figure with ``nd`` decimals, "n/a" where it is undefined (None or NaN)."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def fmt_ci(x: float | None, ci, nd: int = 3) -> str:
    """``x [lo, hi]``: a figure and its interval."""
    lo, hi = ci or (None, None)
    return f"{fmt(x, nd)} [{fmt(lo, nd)}, {fmt(hi, nd)}]"


def fmt_key(row: dict, key: str, nd: int = 3) -> str:
    """:func:`fmt_ci` of ``row[key]`` and its interval ``row[key + "_ci"]``."""
    return fmt_ci(row.get(key), row.get(f"{key}_ci"), nd)


def _take(x: np.ndarray, idx_NI: np.ndarray, axis: int) -> np.ndarray:
    """Replicate n of ``x`` (leading replicate axis) takes entries ``idx_NI[n]`` along ``axis``."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = idx_NI.shape
    return np.take_along_axis(x, idx_NI.reshape(shape), axis=axis)


def value_stat(real_TPK: np.ndarray, imag_STPK: np.ndarray, scale_T: np.ndarray) -> dict[str, np.ndarray]:
    """Value figures (``policy_figures`` on each task's ``scale_T``) per seed and task, averaged over them."""
    figs = policy_figures(real_TPK.mean(-1)[..., None, :, :], imag_STPK.mean(-1), scale_T)
    return {k: _nanmean(v, axis=(-2, -1)) for k, v in figs.items()}


def value_intervals(real_TPK, on_STPK, off_STPK, scale_T=None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict]:
    """Each value figure of ``on`` and ``off`` with its interval, and the paired on − off difference."""
    real, on = np.asarray(real_TPK, np.float64), np.asarray(on_STPK, np.float64)
    scale = np.ptp(real.mean(-1), -1) if scale_T is None else np.asarray(scale_T, np.float64)
    sides = {"on": on, "off": np.asarray(off_STPK, np.float64)}
    rng = np.random.default_rng(seed)
    S, _, P, K = on.shape
    i_s, i_p, i_k = (rng.integers(0, n, (n_boot, n)) for n in (S, P, K))
    real_b = _take(_take(real[None], i_p, 2), i_k, 3)
    point = {k: value_stat(real, v, scale) for k, v in sides.items()}
    boot = {k: value_stat(real_b, _take(_take(_take(v[None], i_s, 1), i_p, 3), i_k, 4), scale)
            for k, v in sides.items()}
    out = {}
    for fig in point["on"]:
        row = {k: float(point[k][fig]) for k in sides} | {f"{k}_ci": interval(boot[k][fig]) for k in sides}
        row["diff"] = row["on"] - row["off"]
        row["diff_ci"] = interval(boot["on"][fig] - boot["off"][fig])
        row["verdict"] = verdict(row["diff"], *row["diff_ci"], "higher with conditioning", "lower with conditioning")
        out[fig] = row
    return out


def step_stat(score_NH: np.ndarray, err_NH: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC and Spearman of uncertainty against error within each step (column) and pooled over all steps."""
    s, e = np.swapaxes(score_NH, -1, -2), np.swapaxes(err_NH, -1, -2)  # [..., H, N]
    bad = e > np.median(e, axis=-1, keepdims=True)
    per_step = auroc(s, bad)
    flat_s, flat_e = s.reshape(*s.shape[:-2], -1), e.reshape(*e.shape[:-2], -1)
    sp = rank_corr(s, e)
    return {"auroc_per_step": per_step, "auroc_within": _nanmean(per_step, -1), "spearman_within": _nanmean(sp, -1),
            "auroc_pooled": auroc(flat_s, flat_e > np.median(flat_e, axis=-1, keepdims=True)),
            "spearman_pooled": rank_corr(flat_s, flat_e)}


def uncertainty_intervals(scores: dict[str, np.ndarray], err_NH: np.ndarray, n_boot: int = N_BOOT,
                          seed: int = 0) -> dict:
    """``step_stat`` of each score and of the step index alone, with intervals, and paired AUROC differences."""
    err = np.asarray(err_NH, np.float64)
    N, H = err.shape
    scores = {**scores, "step index": np.broadcast_to(np.arange(H, dtype=np.float64), (N, H))}
    idx = np.random.default_rng(seed).integers(0, N, (n_boot, N))
    boot = {k: step_stat(np.asarray(v, np.float64)[idx], err[idx]) for k, v in scores.items()}
    out: dict = {"steps": H, "rollouts": N, "scores": {}, "differences": {}}
    for k, v in scores.items():
        pt = step_stat(np.asarray(v, np.float64), err)
        row = {f: float(pt[f]) for f in pt if f != "auroc_per_step"}
        row |= {f"{f}_ci": interval(boot[k][f]) for f in row}
        row["auroc_per_step"] = pt["auroc_per_step"].tolist()
        row["auroc_per_step_ci"] = [interval(boot[k]["auroc_per_step"][:, j]) for j in range(H)]
        for kind in ("within", "pooled"):
            row[f"verdict_{kind}"] = verdict(row[f"auroc_{kind}"], *row[f"auroc_{kind}_ci"], "better than chance",
                                             "worse than chance", 0.5, "no better than chance")
        out["scores"][k] = row
    names = list(scores)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = out["scores"][a]["auroc_within"] - out["scores"][b]["auroc_within"]
            ci = interval(boot[a]["auroc_within"] - boot[b]["auroc_within"])
            out["differences"][f"{a} - {b}"] = {"diff": d, "diff_ci": ci,
                                                "verdict": verdict(d, *ci, f"{a} higher", f"{b} higher")}
    return out
