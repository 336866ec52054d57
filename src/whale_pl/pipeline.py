"""Run the three stages in order, reusing what is complete and resuming what was interrupted.

``python -m whale_pl.pipeline dynamics --scale demo`` trains the dynamics stage, first building any
stage it needs that is missing (tokenizer, then behavior). A stage is *complete* when its run
directory holds ``DONE`` (written atomically after a successful fit, naming the checkpoint); a stage
with ``checkpoints/last.ckpt`` but no ``DONE`` was interrupted and resumes from that checkpoint.
Extra arguments after ``--`` go to ``whale fit`` unchanged (e.g. ``--trainer.devices 8``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("tokenizer", "behavior", "dynamics")


def stage_dir(scale: str, stage: str, runs: Path = Path("runs")) -> Path:
    """The run directory of a stage: ``runs/<scale>/<stage>``."""
    return runs / scale / stage


def stage_config(scale: str, stage: str, stages_root: Path = Path("stages")) -> Path:
    cfg = stages_root / scale / f"{stage}.yaml"
    if not cfg.exists():
        avail = sorted(p.name for p in stages_root.iterdir() if p.is_dir()) if stages_root.exists() else []
        raise FileNotFoundError(f"no config {cfg} for stage '{stage}' at scale '{scale}' (scales: {avail})")
    return cfg


def is_complete(scale: str, stage: str) -> bool:
    """Whether the stage finished (its run directory holds ``DONE``)."""
    return (stage_dir(scale, stage) / "DONE").exists()


def sha256_of(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mark_done(run_dir: Path, info: dict) -> None:
    tmp = run_dir / "DONE.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "DONE")


def done_checkpoint(scale: str, stage: str) -> Path:
    """The checkpoint a finished stage's ``DONE`` names, checked against the sha256 recorded there."""
    done = stage_dir(scale, stage) / "DONE"
    info = json.loads(done.read_text())
    if "checkpoint" not in info:
        raise SystemExit(f"[whale] {done} names no checkpoint (written by an older whale_pl); retrain with "
                         f"`python -m whale_pl.pipeline {stage} --scale {scale} --force`")
    ckpt = Path(info["checkpoint"])
    if not ckpt.is_file() or sha256_of(ckpt) != info["sha256"]:
        raise SystemExit(f"[whale] {ckpt}, the checkpoint {done} names, is missing or has changed since the stage "
                         f"finished (sha256 {info['sha256'][:12]}... recorded); retrain with "
                         f"`python -m whale_pl.pipeline {stage} --scale {scale} --force`")
    return ckpt


def fmt_elapsed(seconds: float) -> str:
    """Seconds as m:ss."""
    m, s = divmod(int(seconds), 60)
    return f"{m:d}:{s:02d}"


def _move_aside(run_dir: Path) -> None:
    """Start a clean run directory: an old one is renamed ``<stage>.old-<time>``, never deleted."""
    if run_dir.exists() and any(run_dir.iterdir()):
        stem = f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        aside = next(p for i in range(1000) if not (p := run_dir.with_name(stem + (f"-{i}" if i else ""))).exists())
        os.replace(run_dir, aside)
        print(f"[whale] moved the previous run aside to {aside}", flush=True)


def _written_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint the fit wrote (the newest ``best*.ckpt``; ``last.ckpt`` without one)."""
    ckpts = sorted((run_dir / "checkpoints").glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpts:
        return ckpts[-1]
    if last.is_file():
        return last
    raise SystemExit(f"[whale] the fit finished but wrote no checkpoint under {run_dir / 'checkpoints'}")


def _handoff_args(scale: str, stage: str) -> list[str]:
    """The earlier stages' checkpoints, as their DONE records name them, for this stage's config."""
    earlier = STAGES[: STAGES.index(stage)]
    return [x for st in earlier for x in (f"--model.init_args.{st}_ckpt", str(done_checkpoint(scale, st)))]


def run_stage(scale: str, stage: str, extra: list[str] | None = None, force: bool = False) -> Path:
    """Train one stage unless complete; resume from ``last.ckpt`` when a previous run was cut off.
    ``force`` (or a run directory holding something else than an interrupted run) starts clean."""
    run_dir = stage_dir(scale, stage)
    cfg = stage_config(scale, stage)
    if is_complete(scale, stage) and not force:
        print(f"[whale] {stage}: complete ({run_dir / 'DONE'}), reusing it", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "whale_pl.cli", "fit", "--config", str(cfg), *_handoff_args(scale, stage)]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists() and not force and not (run_dir / "DONE").exists():
        print(f"[whale] {stage}: resuming interrupted run from {last}", flush=True)
        cmd += ["--ckpt_path", str(last)]
    else:
        _move_aside(run_dir)
    cmd += list(extra or [])
    print(f"[whale] {stage}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[whale] {stage}: training failed (exit {proc.returncode}); rerun to resume")
    ckpt = _written_checkpoint(run_dir)
    _mark_done(run_dir, {"stage": stage, "scale": scale, "config": str(cfg), "seconds": time.time() - t0,
                         "checkpoint": str(ckpt), "sha256": sha256_of(ckpt)})
    print(f"[whale] {stage}: done in {fmt_elapsed(time.time() - t0)} -> {ckpt}", flush=True)
    return run_dir


def run_until(scale: str, target: str, extra: list[str] | None = None, force: bool = False) -> None:
    """Build every stage up to ``target``: missing earlier stages first, then ``target`` itself."""
    if target not in STAGES:
        raise SystemExit(f"unknown stage '{target}'; expected one of {STAGES}")
    upto = STAGES.index(target)
    for i, stage in enumerate(STAGES[: upto + 1]):
        last_one = i == upto
        run_stage(scale, stage, extra=extra if last_one else None, force=force and last_one)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m whale_pl.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--scale", default="demo")
    p.add_argument("--force", action="store_true", help="retrain the named stage even if complete")
    a = p.parse_args(argv)
    run_until(a.scale, a.stage, extra=extra, force=a.force)


if __name__ == "__main__":
    main()
