"""`whale eval value`: value estimation of policies in imagination, and uncertainty quality, per split.

    whale eval value --dynamics runs/demo/dynamics/checkpoints/best.ckpt \
        [--ensemble CKPT CKPT ...] [--data-config stages/demo/data.yaml] [--starts 5] [--horizon 15] \
        [--discount 0.99] [--K 3] [--modes open_loop closed_loop] --out runs/demo/value.json

Writes the value figures of every mode and split with bootstrap intervals (``rollout/stats.py``), the
rollouts' PSNR/SSIM beside copying the last real frame, and the uncertainty figures (retracing, and the
ensemble when given) to one JSON, with ``<out>_returns.png`` and ``<out>_step_auroc.png`` beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from whale_pl.io import atomic_path, write_json_atomic
from whale_pl.rollout.stats import fmt_key
from whale_pl.rollout.value_metrics import nan_to_none

MODES = ("open_loop", "closed_loop")


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
    """Imagined against real return per (task, policy), both over the task's real range, one panel per mode;
    colour: model (``models[label][mode]`` imagined returns [S, T, P, K]), marker: split."""
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
    """AUROC of each uncertainty within each imagined step index (95 % band), against chance (0.5, also
    what the step index alone scores within a step index) and the step index's pooled AUROC."""
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
    """The return scatter of ``models`` (``<stem>_returns.png``) and, with uncertainty figures, the per-step
    AUROC curve (``<stem>_step_auroc.png``); their paths under ``names``."""
    r, plots = res["returns"], {names[0]: f"{stem}_returns.png"}
    plot_returns(r["real_TPK"], r["split"], models, Path(plots[names[0]]), titles[0])
    if "uncertainty" in res:
        plots[names[1]] = f"{stem}_step_auroc.png"
        plot_step_auroc(res["uncertainty"]["mse"], Path(plots[names[1]]), titles[1])
    return plots


def video_summary(errors: dict[str, dict], split_B: np.ndarray) -> dict:
    """Mean PSNR / SSIM of open-loop rollouts per split (and ``all``) for each labelled set of
    :func:`~whale_pl.rollout.value.rollout_errors` (``copy_``/``recon_`` keys become their own rows)."""
    rows = {}
    for label, e in errors.items():
        for pre, name in (("", label), ("copy_", "copy the last real frame"), ("recon_", "tokenizer reconstruction")):
            if f"{pre}psnr" in e:
                rows[name] = {k: np.asarray(e[f"{pre}{k}"], np.float64) for k in ("psnr", "ssim")}
    return {s: {n: {k: float(v[sel].mean()) for k, v in r.items()} for n, r in rows.items()}
            for s, sel in split_masks(split_B).items()}


def split_masks(split_B) -> dict[str, np.ndarray]:
    """A boolean mask of each split's entries (in order of appearance), then ``all``."""
    split = np.asarray(split_B)
    return {s: split == s for s in dict.fromkeys(split.tolist())} | {"all": np.ones(len(split), bool)}


def split_values(res: dict, on: dict, off: dict | None = None, **kw) -> dict:
    """Per mode and split (and ``all``): :func:`~whale_pl.rollout.stats.value_intervals` of the imagined
    returns ``on[mode]`` ([S, T, P, K]) against ``res["real_TPK"]`` (and the paired difference to ``off``),
    each normalised by the task's real return range over every evaluated policy."""
    from whale_pl.rollout.stats import value_intervals

    real = np.asarray(res["real_TPK"], np.float64)
    kw.setdefault("scale_T", np.ptp(real.mean(-1), -1))  # every split on its task's range over all policies
    return {mode: {s: value_intervals(real[:, sel], np.asarray(on[mode])[:, :, sel],
                                      None if off is None else np.asarray(off[mode])[:, :, sel], **kw)
                   for s, sel in split_masks(res["split"]).items()} for mode in MODES if mode in on}


def uncertainty_summary(wm, rollouts: list, errors: dict, K: int, members: list | None = None,
                        progress: bool = True) -> dict:
    """Retracing (and the ensemble of ``members``) on the open-loop rollouts against their true errors: the
    seconds, ``uncertainty_figures`` per error, and the per-step uncertainties and errors [B, H-1] as lists."""
    from whale_pl.rollout.value import evaluate_uncertainty, uncertainty_figures

    unc = evaluate_uncertainty(wm, rollouts, K=K, ensemble=members or None, progress=progress)
    steps = {**unc["per_step"], "mse": errors["mse"], "token_err": errors["token_err"]}
    return {"K": K, "seconds": unc["seconds"], **uncertainty_figures(unc, errors),
            "per_step": {k: np.asarray(v).tolist() for k, v in steps.items()}}


def run(dynamics: str, ensemble: list[str] | None, data_config: str, starts: int, horizon: int, discount: float,
        K: int, modes: list[str], device: str = "cpu", progress: bool = True) -> dict:
    """Everything `whale eval value` computes, as a dict."""
    from whale_pl.rollout.value import EvalSet, WorldModel, collect_real, evaluate_values, rollout_errors

    wm = WorldModel.load(dynamics, device)
    ev = EvalSet.from_data_config(data_config, starts=starts, horizon=horizon, discount=discount,
                                  frame_stride=wm.frame_stride)
    members = [WorldModel.load(p, device) for p in ensemble or ()]
    if any(m.frame_stride != wm.frame_stride for m in members):
        raise ValueError(f"ensemble members {ensemble} must step {wm.frame_stride} recorded step(s) at a time like "
                         f"{dynamics}: the members must share the model's clock (data frame_stride)")
    real = collect_real(ev, progress=progress)
    res = evaluate_values(wm, real, ev, modes=modes, progress=progress)
    rollouts = res.pop("_rollouts", None)
    out = {"dynamics": str(dynamics), "uses_behavior": wm.uses_behavior, "data_config": data_config, "starts": starts,
           "splits": ev.splits, "returns": res,
           "value": split_values(res, {m: [res[m]["imagined_TPK"]] for m in modes})}
    if rollouts is not None:
        errors = rollout_errors(wm, real, rollouts, baselines=True)
        out["video"] = video_summary({"model": errors}, np.array([ev.split_of(p) for p in real.policy]))
        out["uncertainty"] = {**uncertainty_summary(wm, rollouts, errors, K, members, progress),
                              "ensemble": list(ensemble or [])}
    return out


def main(argv: list[str] | None = None) -> int:
    """``whale eval value`` (arguments: ``--help``)."""
    p = argparse.ArgumentParser(prog="whale eval value", description=__doc__.split("\n")[0])
    p.add_argument("--dynamics", required=True, help="dynamics-stage checkpoint")
    p.add_argument("--ensemble", nargs="*", default=None, help="checkpoints of the ensemble members (>= 2)")
    p.add_argument("--data-config", default="stages/demo/data.yaml",
                   help="Meta-World dataset config naming tasks, training and OOD policies")
    p.add_argument("--starts", type=int, default=5, help="start states per task")
    p.add_argument("--horizon", type=int, default=15, help="imagined steps (model steps)")
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--K", type=int, default=3, help="retracing anchors per imagined step")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="JSON path; plots go beside it")
    a = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    if a.ensemble is not None and len(a.ensemble) < 2:
        p.error(f"--ensemble needs at least 2 checkpoints, got {len(a.ensemble)}")
    for path in [a.dynamics] + list(a.ensemble or []):
        if not Path(path).is_file():
            p.error(f"checkpoint not found: {path}")
    if "open_loop" not in a.modes:
        print("note: video and uncertainty figures need the open_loop mode; they are skipped", file=sys.stderr)
    res = run(a.dynamics, a.ensemble, a.data_config, a.starts, a.horizon, a.discount, a.K, a.modes, a.device)
    out, r = Path(a.out), res["returns"]
    res["plots"] = write_plots(res, out.with_suffix(""), {"model": {m: [r[m]["imagined_TPK"]] for m in a.modes}},
                               ("returns", "step_auroc"), (str(a.dynamics),) * 2)
    write_json_atomic(out, nan_to_none(res))
    for mode in a.modes:
        for s, f in res["value"][mode].items():
            print(f"{mode} {s}: " + ", ".join(f"{k} {fmt_key(v, 'on')}" for k, v in f.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
