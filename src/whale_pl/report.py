"""The demo report: ``runs/<scale>/report.md`` from what the pipeline's steps wrote (``video_metrics.json``,
``gifs/index.json``, the stages' ``DONE``; ``experiment.md`` and ``mbpo.md`` embedded as they are); a missing input
is named with the command that makes it, GIFs linked by relative path with the command that regenerates them."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from whale_pl.io import write_text_atomic
from whale_pl.pipeline import STAGES

VAL_TAGS = (("val/acc", "teacher-forced token accuracy"), ("val/copy_acc", "copy-the-previous-frame baseline"),
            ("val/acc_minus_copy", "accuracy minus copy"), ("val/ce", "teacher-forced cross-entropy (nats)"),
            ("val/psnr_ar_train_family", "8-step autoregressive PSNR (dB), training-family episodes"),
            ("val/psnr_ar_ood",
             "8-step autoregressive PSNR (dB), `ood` episodes (held-out policies: `ood_params` and `ood_families`)"))
WHY_MISSING = {"val/psnr_ar_ood": "not logged: the stage validates on its `val_splits` only, so that no checkpoint "
                                  "is chosen on held-out policies; the experiment below scores them"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "—" if v is None else str(v)


def dynamics_section(scale: str, runs: Path) -> list[str]:
    """The dynamics stage's last validation (TensorBoard): teacher-forced accuracy beside copying, rollout PSNR."""
    d = runs / scale / "dynamics"
    lines = ["## Dynamics: last validation of the stage run", ""]
    vals = {}
    if any(d.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        have = set(acc.Tags().get("scalars", []))
        vals = {t: (acc.Scalars(t)[-1].step, float(acc.Scalars(t)[-1].value)) for t, _ in VAL_TAGS if t in have}
    if not vals:
        return lines + [f"_missing: no TensorBoard events with val/ scalars under {d} (train it: "
                        f"`python -m whale_pl.pipeline dynamics --scale {scale}`)_", ""]
    clock = ""
    if (d / "checkpoints" / "best.ckpt").is_file():  # the clock is in the checkpoint's data_spec
        from whale_pl.rollout.value import frame_stride_of

        k = frame_stride_of(d / "checkpoints" / "best.ckpt")
        clock = f" The model's clock: one step = {k} recorded step{'s' if k > 1 else ''} (data `frame_stride`)."
    lines += ["| figure | value |", "|---|---|"]
    for tag, name in VAL_TAGS:
        v = vals[tag][1] if tag in vals else None
        shown = (WHY_MISSING.get(tag, "missing (not logged)") if v is None else f"{100 * v:+.3f} pt" if tag == "val/acc_minus_copy"
                 else _fmt(v))
        lines.append(f"| {name} | {shown} |")
    return lines + ["", f"Held-out clips of the last validation (global step {max(s for s, _ in vals.values())}); "
                    f"logged to TensorBoard under `{d}`.{clock}", ""]


def gifs_section(scale: str, root: Path, runs: Path) -> list[str]:
    """Real-against-imagined rollout GIFs from ``<root>/gifs/index.json`` (``whale eval gifs``)."""
    gdir = root / "gifs"
    index = _load(gdir / "index.json")
    lines = ["## Rollouts: real against imagined", ""]
    if not index:
        return lines + [f"_missing: {gdir / 'index.json'} (run `whale eval gifs --ckpt "
                        f"{runs / scale / 'dynamics' / 'checkpoints' / 'best.ckpt'} --shards <data.yaml's out> "
                        f"--out {gdir}`)_", ""]
    lines += ["Each GIF: a held-out episode's real frames (left) beside the model's open-loop imagination with the "
              f"recorded actions (right); under them the retracing uncertainty (blue, K={index.get('K')} anchors) and "
              "the pixel MSE against the real frame (red, dashed). `val`: the training policies; `ood`: held-out "
              f"policies. Checkpoint `{index.get('ckpt')}`, episodes from `{index.get('shards')}`.", "",
              f"Regenerate all GIFs: `{index['command']}`", ""]
    for c in index["clips"]:
        head = f"{c.get('split')}: {c.get('task')}, policy {c.get('policy')}"
        sp = c.get("spearman_uncertainty_vs_mse")
        sp = _fmt(sp) if sp is not None else "undefined (too few scored steps or a constant curve)"
        lines += [f"### {head}", "", f"![{head}](gifs/{c['gif']})", "",
                  f"Episode `{c.get('episode')}` from frame {c.get('start')}, {c.get('context')} context frame(s), "
                  f"{c.get('horizon')} imagined steps: PSNR {_fmt(c.get('psnr_mean'))} dB, mean uncertainty "
                  f"{_fmt(c.get('uncertainty_mean'))}, Spearman(uncertainty, MSE) over the steps {sp}.", ""]
    return lines


def _embed(md: Path, title: str, cmd: str) -> list[str]:
    """``md`` one heading level down, or a ``title`` section naming it missing with the command that makes it."""
    if not md.is_file():
        return [f"## {title}", "", f"_missing: {md} (run `{cmd}`)_", ""]
    return [re.sub(r"^(#+) ", r"#\1 ", md.read_text(), flags=re.M), f"Regenerate: `{cmd}`", ""]


def video_section(root: Path, vid: dict | None) -> list[str]:
    """Rollout PSNR / SSIM / FVD of ``whale eval video`` beside copying the last real frame."""
    lines = ["## Video fidelity (dynamics rollouts on held-out clips)", ""]
    if not vid:
        return lines + [f"_missing: {root / 'video_metrics.json'} (run `whale eval video ...`)_", ""]
    cells = {pre: " | ".join(_fmt(vid.get(k if k == "num_clips" else pre + k))
                             for k in ("psnr", "ssim", "fvd", "num_clips")) for pre in ("", "copy_")}
    return lines + ["| rollout | PSNR (dB) | SSIM | FVD | clips |", "|---|---|---|---|---|",
                    f"| dynamics model | {cells['']} |", f"| copy the last real frame | {cells['copy_']} |", "",
                    f"Command: `whale eval video --ckpt {vid.get('ckpt')} --shards {vid.get('shards', '<shards>')} "
                    f"--num-clips {vid.get('num_clips')} --clip-len {vid.get('clip_len', 16)} --split "
                    f"{vid.get('split', 'val')} --out {root / 'video_metrics.json'}`. The experiment's open-loop "
                    "rollouts: table (3) of its section below. FVD is missing without I3D weights (`make setup`) "
                    "or with fewer than 2 clips.", ""]


def build_report(scale: str, runs: Path = Path("runs")) -> str:
    """The report's markdown, from whatever the pipeline's steps have written under ``runs/<scale>``."""
    root = runs / scale
    lines = [f"# whale_pl demo report (scale `{scale}`)", "", "## Stages", "", "| stage | status | seconds |",
             "|---|---|---|"]
    for st in STAGES:
        done = _load(root / st / "DONE")
        lines.append(f"| {st} | {'complete' if done else 'missing'} | {_fmt((done or {}).get('seconds'))} |")
    lines += ["", f"Regenerate a stage: `python -m whale_pl.pipeline <stage> --scale {scale} --force`.", ""]
    exp_cmd, plan_cmd = f"python -m whale_pl.experiment --scale {scale}", f"whale plan --scale {scale}"
    lines += dynamics_section(scale, runs) + video_section(root, _load(root / "video_metrics.json"))
    lines += gifs_section(scale, root, runs) + _embed(root / "experiment.md", "Headline experiment", exp_cmd)
    if (root / "mbpo.md").is_file():
        lines += _embed(root / "mbpo.md", "Model-based control in imagination", plan_cmd)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m whale_pl.report [--scale demo]``: write ``runs/<scale>/report.md``."""
    p = argparse.ArgumentParser(prog="python -m whale_pl.report", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    scale = p.parse_args(argv).scale
    out = write_text_atomic(Path("runs") / scale / "report.md", build_report(scale))
    print(f"[report] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
