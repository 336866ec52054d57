"""Figures of merit of value estimation and uncertainty (docs/method.md, "Value evaluation"), NaN where undefined,
their bootstrap intervals and verdicts (Intervals), per-split summaries and plots."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from whale_pl.io import atomic_path

MODES = ("open_loop", "closed_loop")
LEVEL, N_BOOT = 0.95, 2000


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
    """value_gap, bias, spearman, pearson, regret_at_1 over the last axis, on the real range or ``scale``."""
    real, imag = np.broadcast_arrays(np.asarray(real_P, np.float64), np.asarray(imag_P, np.float64))
    rng = np.broadcast_to(np.ptp(real, axis=-1) if scale is None else np.asarray(scale, np.float64), real.shape[:-1])
    rng = np.where(rng > 0, rng, np.nan)
    err = (imag - real) / rng[..., None]
    picked = np.take_along_axis(real, imag.argmax(-1)[..., None], -1)[..., 0]
    regret = (real.max(-1) - picked) / rng if real.shape[-1] > 1 else rng * np.nan  # one policy: nothing to pick
    return {"value_gap": np.abs(err).mean(-1), "bias": err.mean(-1), "spearman": rank_corr(real, imag),
            "pearson": corr(real, imag), "regret_at_1": regret}


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for binary ``labels`` over the last axis (Mann–Whitney U); NaN with one class present."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
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


def split_masks(split_B) -> dict[str, np.ndarray]:
    """A boolean mask of each split's entries (in order of appearance), then ``all``."""
    split = np.asarray(split_B)
    return {s: split == s for s in dict.fromkeys(split.tolist())} | {"all": np.ones(len(split), bool)}


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


def task_scale(real_TPK: np.ndarray) -> np.ndarray:
    """Each task's range of the policies' mean real returns [T]: the scale value gaps are normalised by."""
    return np.ptp(np.asarray(real_TPK, np.float64).mean(-1), -1)


def value_stat(real_TPK: np.ndarray, imag_STPK: np.ndarray, scale_T: np.ndarray) -> dict[str, np.ndarray]:
    """Value figures (``policy_figures`` on each task's ``scale_T``) per seed and task, averaged over them."""
    figs = policy_figures(real_TPK.mean(-1)[..., None, :, :], imag_STPK.mean(-1), scale_T)
    return {k: _nanmean(v, axis=(-2, -1)) for k, v in figs.items()}


def value_intervals(real_TPK, on_STPK, off_STPK, scale_T=None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict]:
    """Each value figure of ``on`` and ``off`` with its interval, and the paired on − off difference."""
    real, on = np.asarray(real_TPK, np.float64), np.asarray(on_STPK, np.float64)
    scale = task_scale(real) if scale_T is None else np.asarray(scale_T, np.float64)
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


def split_values(res: dict, on: dict, off: dict) -> dict:
    """Per mode and split: ``value_intervals`` of ``on[mode]`` and ``off[mode]`` [S, T, P, K] on each task's range."""
    real = np.asarray(res["real_TPK"], np.float64)
    scale_T = task_scale(real)
    return {mode: {s: value_intervals(real[:, sel], np.asarray(on[mode])[:, :, sel],
                                      np.asarray(off[mode])[:, :, sel], scale_T)
                   for s, sel in split_masks(res["split"]).items()} for mode in MODES if mode in on}


def video_summary(errors: dict[str, dict], split_B: np.ndarray) -> dict:
    """Mean PSNR / SSIM per split of each labelled ``rollout_errors`` (``copy_``/``recon_`` keys: their own rows)."""
    rows = {}
    for label, e in errors.items():
        for pre, name in (("", label), ("copy_", "copy the last real frame"), ("recon_", "tokenizer reconstruction")):
            if f"{pre}psnr" in e:
                rows[name] = {k: np.asarray(e[f"{pre}{k}"], np.float64) for k in ("psnr", "ssim")}
    return {s: {n: {k: float(v[sel].mean()) for k, v in r.items()} for n, r in rows.items()}
            for s, sel in split_masks(split_B).items()}


def _panels(n: int):
    """A figure of ``n`` side-by-side panels (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(5 * n, 4.2), squeeze=False)


def _savefig(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_returns(real_TPK, split: list[str], models: dict[str, dict], path: Path, title: str = "") -> None:
    """Imagined against real return per (task, policy), a panel per mode; colour: model, marker: split."""
    real = np.asarray(real_TPK, np.float64).mean(-1)
    lo, rng = real.min(-1, keepdims=True), np.ptp(real, -1, keepdims=True).clip(1e-9)
    modes = [m for m in MODES if all(m in v for v in models.values())]
    fig, axes = _panels(len(modes))
    marks = dict(zip(dict.fromkeys(split), "oxs^v"))
    for ax, mode in zip(axes[0], modes):
        for c, (label, v) in enumerate(models.items()):
            imag = (np.asarray(v[mode], np.float64).mean((0, -1)) - lo) / rng
            for s, mk in marks.items():
                sel = np.array(split) == s
                ax.scatter(((real - lo) / rng)[:, sel].ravel(), imag[:, sel].ravel(), marker=mk, color=f"C{c}",
                           alpha=0.7, label=f"{label}, {s}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(title=mode, xlabel="real return (over the task's real range)", ylabel="imagined return (same scale)")
        ax.legend(fontsize=7)
    _savefig(fig, path, title)


def plot_step_auroc(unc: dict, path: Path, title: str = "") -> None:
    """AUROC of each uncertainty within each imagined step (95 % band), chance and the step index's pooled AUROC."""
    fig, axes = _panels(1)
    ax, first = axes[0][0], 2  # scored steps are imagined frames 2..H-1
    for c, (name, row) in enumerate(unc["scores"].items()):
        if name == "step index":
            ax.axhline(row["auroc_pooled"], color="gray", ls=":", label=f"step index alone, pooled "
                       f"({row['auroc_pooled']:.2f})")
            continue
        x = np.arange(first, first + len(row["auroc_per_step"]))
        ci = np.array(row["auroc_per_step_ci"], dtype=np.float64)
        ax.plot(x, np.array(row["auroc_per_step"], dtype=np.float64), "o-", color=f"C{c}", label=name)
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=f"C{c}", alpha=0.2)
    ax.axhline(0.5, color="k", lw=0.8, label="chance = step index alone within a step")
    ax.set(xlabel="imagined step", ylabel="AUROC (bad: error above the step's median)", ylim=(0, 1))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    _savefig(fig, path, title)


def write_plots(res: dict, stem: Path, models: dict[str, dict], names: tuple[str, str],
                titles: tuple[str, str]) -> dict[str, str]:
    """``<stem>_returns.png`` and ``<stem>_step_auroc.png``; their paths under ``names``."""
    plots = {names[0]: f"{stem}_returns.png", names[1]: f"{stem}_step_auroc.png"}
    plot_returns(res["returns"]["real_TPK"], res["returns"]["split"], models, Path(plots[names[0]]), titles[0])
    plot_step_auroc(res["uncertainty"]["mse"], Path(plots[names[1]]), titles[1])
    return plots
