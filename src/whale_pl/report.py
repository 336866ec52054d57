"""The demo report: ``runs/<scale>/report.md`` from what the pipeline's steps wrote.

Reads ``video_metrics.json`` (``whale eval video``), ``experiment.json`` / ``experiment.md``
(``python -m whale_pl.experiment``) and the stages' ``DONE`` files; a missing input is named in the
report rather than silently left out. Plots are linked by relative path, each with the command that
regenerates it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from whale_pl.pipeline import STAGES, stage_dir


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "—" if v is None else str(v)


def _value_row(name: str, res: dict | None, mode: str) -> list[str]:
    """One metrics-table row from a ``value_cli.run`` result (``res['value'][mode]``)."""
    v = ((res or {}).get("value") or {}).get(mode) or {}
    ood = v.get("ood") or {}
    allp = v.get("all") or {}
    return [name, mode, _fmt(ood.get("value_gap")), _fmt(ood.get("spearman")), _fmt(ood.get("pearson")),
            _fmt(allp.get("regret_at_1"))]


def build_report(scale: str, runs: Path = Path("runs")) -> str:
    root = runs / scale
    lines = [f"# whale_pl demo report (scale `{scale}`)", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for st in STAGES:
        done = _load(stage_dir(scale, st, runs) / "DONE")
        lines.append(f"| {st} | {'complete' if done else 'missing'} | {_fmt((done or {}).get('seconds'))} |")
    lines += ["", "Regenerate a stage: `python -m whale_pl.pipeline <stage> --scale " + scale + " --force`.", ""]

    vid = _load(root / "video_metrics.json")
    lines += ["## Video fidelity (dynamics rollouts on held-out clips)", ""]
    if vid:
        lines += ["| PSNR (dB) | SSIM | FVD | clips |", "|---|---|---|---|",
                  f"| {_fmt(vid.get('psnr'))} | {_fmt(vid.get('ssim'))} | {_fmt(vid.get('fvd'))} | "
                  f"{_fmt(vid.get('num_clips'))} |", "",
                  f"Command: `whale eval video --ckpt {vid.get('ckpt')} --shards <demo shards> --num-clips 16`", ""]
    else:
        lines += [f"_missing: {root / 'video_metrics.json'} (run `whale eval video ...`)_", ""]

    exp = _load(root / "experiment.json")
    lines += ["## Value estimation and uncertainty", ""]
    if exp:
        lines += ["| model | mode | OOD value gap | OOD Spearman | OOD Pearson | regret@1 (all) |",
                  "|---|---|---|---|---|---|"]
        for key, name in (("main", "stage model"), ("on", "member 0 (behavior on)"), ("off", "behavior off")):
            for mode in ("open_loop", "closed_loop"):
                lines.append("| " + " | ".join(_value_row(name, exp.get(key), mode)) + " |")
        unc = exp.get("uncertainty") or {}
        q = unc.get("quality_vs_mse") or {}
        lines += ["", "Uncertainty against the true per-step error (pixel MSE):", "",
                  "| uncertainty | AUROC | Spearman |", "|---|---|---|"]
        for meth in ("retracing", "ensemble"):
            u = q.get(f"{meth}_score") or {}
            lines.append(f"| {meth} | {_fmt(u.get('auroc'))} | {_fmt(u.get('spearman'))} |")
        lines += ["", f"Cost ratio (ensemble / retracing time): {_fmt(unc.get('cost_ratio_ensemble_over_retracing'))}",
                  ""]
        for title, pth in (exp.get("plots") or {}).items():
            rel = os.path.relpath(pth, root)
            lines += [f"### {title}", "", f"![{title}]({rel})", "",
                      f"Regenerate: `python -m whale_pl.experiment --scale {scale}`", ""]
        md = root / "experiment.md"
        if md.is_file():
            lines += ["## Experiment details", "", md.read_text(), ""]
    else:
        lines += [f"_missing: {root / 'experiment.json'} (run `python -m whale_pl.experiment --scale {scale}`)_", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m whale_pl.report", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    p.add_argument("--runs", default="runs")
    a = p.parse_args(argv)
    out = Path(a.runs) / a.scale / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(build_report(a.scale, Path(a.runs)))
    os.replace(tmp, out)
    print(f"[report] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
