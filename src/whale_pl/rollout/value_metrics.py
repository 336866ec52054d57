"""Figures of merit of value estimation and uncertainty (docs/method.md, "Value evaluation"), NaN where undefined,
their per-split summaries and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from whale_pl.io import atomic_path

MODES = ("open_loop", "closed_loop")


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


def split_values(res: dict, on: dict, off: dict) -> dict:
    """Per mode and split: ``value_intervals`` of ``on[mode]`` and ``off[mode]`` [S, T, P, K] on each task's range."""
    from whale_pl.rollout.stats import value_intervals

    real = np.asarray(res["real_TPK"], np.float64)
    scale_T = np.ptp(real.mean(-1), -1)
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
