"""`whale eval value`: value estimation of policies in imagination, and uncertainty quality.

    whale eval value --dynamics runs/demo/dynamics/checkpoints/best.ckpt \
        [--ensemble CKPT CKPT ...] [--data-config stages/demo/data.yaml] [--starts 2] [--horizon 32] \
        [--discount 0.99] [--K 3] [--modes open_loop closed_loop] --out runs/demo/value.json

Writes the value figures of every mode and the uncertainty figures (retracing, and the ensemble when
given) to one JSON, with ``<out>_returns.png`` and ``<out>_uncertainty.png`` beside it. Renders Meta-World.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from whale_pl.io import atomic_path, write_json_atomic
from whale_pl.rollout.value_metrics import nan_to_none


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


def plot_returns(res: dict, path: Path, title: str = "") -> None:
    """Real against imagined return per policy, one panel per mode; OOD policies as crosses."""
    modes = [m for m in ("open_loop", "closed_loop") if m in res]
    fig, axes = _panels(len(modes))
    real, split = np.array(res["real_return"]), np.array(res["split"])
    for ax, mode in zip(axes[0], modes):
        imag = np.array(res[mode]["imagined_return"])
        for s, marker in (("train", "o"), ("ood", "x")):
            ax.scatter(real[split == s], imag[split == s], marker=marker, label=f"{s} families")
        for p, x, y in zip(res["policies"], real, imag):
            ax.annotate(p, (x, y), fontsize=6, alpha=0.7)
        lo, hi = min(real.min(), imag.min()), max(real.max(), imag.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        f = res[mode].get("all") or {}
        ax.set_title(f"{mode}: gap {f.get('value_gap', float('nan')):.3f}, "
                     f"spearman {f.get('spearman', float('nan')):.2f}", fontsize=9)
        ax.set(xlabel="real return (simulator)", ylabel="imagined return (world model)")
        ax.legend(fontsize=7)
    _savefig(fig, path, title)


def plot_uncertainty(unc: dict, path: Path, title: str = "") -> None:
    """Per-step uncertainty (retracing, ensemble) against the true per-step error (pixel MSE)."""
    ps = unc["per_step"]
    methods = [m for m in ("retracing", "ensemble") if f"{m}_score" in ps]
    fig, axes = _panels(len(methods))
    err = np.asarray(ps["mse"])[:, 1:].ravel()
    for ax, m in zip(axes[0], methods):
        ax.scatter(err, np.asarray(ps[f"{m}_score"])[:, 1:].ravel(), s=6, alpha=0.5)
        q = unc["quality_vs_mse"][f"{m}_score"]
        ax.set_title(f"{m}: spearman {q['spearman']:.2f}, AUROC {q['auroc']:.2f}", fontsize=9)
        ax.set(xlabel="true per-step error (pixel MSE)", ylabel="uncertainty score")
    _savefig(fig, path, title)


def run(dynamics: str, ensemble: list[str] | None, data_config: str, starts: int, horizon: int, discount: float,
        K: int, modes: list[str], device: str = "cpu", progress: bool = True, real=None,
        uncertainty: bool = True) -> dict:
    """Everything `whale eval value` computes, as a dict (also used by the headline experiment);
    ``uncertainty=False`` skips the per-step uncertainty of the open-loop rollouts."""
    from whale_pl.rollout.value import EvalSet, WorldModel, collect_real, evaluate_uncertainty, evaluate_values

    wm = WorldModel.load(dynamics, device)
    ev = EvalSet.from_data_config(data_config, starts=starts, horizon=horizon, discount=discount,
                                  frame_stride=wm.frame_stride)
    if real is None:
        real = collect_real(ev, progress=progress)
    members = [WorldModel.load(p, device) for p in ensemble] if ensemble else None
    for p, m in zip(ensemble or [], members or []):
        if m.frame_stride != wm.frame_stride:
            raise ValueError(f"ensemble member {p} steps {m.frame_stride} recorded step(s) at a time, {dynamics} "
                             f"{wm.frame_stride}: the members must share the model's clock (data frame_stride)")
    t0 = time.time()
    res = evaluate_values(wm, real, ev, modes=modes, progress=progress)
    rollouts = res.pop("_rollouts", None)
    out = {"dynamics": str(dynamics), "uses_behavior": wm.uses_behavior, "data_config": data_config,
           "starts": starts, "tasks": ev.tasks, "real_seconds": real.seconds, "value": res}
    if rollouts is not None and uncertainty:
        out["uncertainty"] = evaluate_uncertainty(wm, real, rollouts, K=K, ensemble=members, progress=progress)
        if members:
            out["ensemble"] = [str(p) for p in ensemble]
    out["seconds"] = time.time() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    """``whale eval value`` (arguments: ``--help``)."""
    p = argparse.ArgumentParser(prog="whale eval value", description=__doc__.split("\n")[0])
    p.add_argument("--dynamics", required=True, help="dynamics-stage checkpoint")
    p.add_argument("--ensemble", nargs="*", default=None, help="checkpoints of the ensemble members (>= 2)")
    p.add_argument("--data-config", default="stages/demo/data.yaml",
                   help="Meta-World dataset config naming tasks, training and OOD policies")
    p.add_argument("--starts", type=int, default=2, help="start states per task")
    p.add_argument("--horizon", type=int, default=32)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--K", type=int, default=3, help="retracing anchors per imagined step")
    p.add_argument("--modes", nargs="+", default=["open_loop", "closed_loop"], choices=["open_loop", "closed_loop"])
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
        print("note: uncertainty figures need the open_loop mode; they are skipped", file=sys.stderr)
    res = run(a.dynamics, a.ensemble, a.data_config, a.starts, a.horizon, a.discount, a.K, a.modes, a.device)
    out = Path(a.out)
    res["plots"] = {"returns": str(out.with_name(out.stem + "_returns.png"))}
    plot_returns(res["value"], Path(res["plots"]["returns"]), title=str(a.dynamics))
    if "uncertainty" in res:
        res["plots"]["uncertainty"] = str(out.with_name(out.stem + "_uncertainty.png"))
        plot_uncertainty(res["uncertainty"], Path(res["plots"]["uncertainty"]), title=str(a.dynamics))
    write_json_atomic(out, nan_to_none(res))
    for mode in a.modes:
        f = res["value"][mode]["all"] or {}
        print(f"{mode}: value_gap {f.get('value_gap')}, spearman {f.get('spearman')}, regret@1 {f.get('regret_at_1')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
