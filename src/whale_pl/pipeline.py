"""Run the three stages in order, reusing what is complete and resuming what was interrupted.

``python -m whale_pl.pipeline dynamics --scale demo`` trains the dynamics stage, first building any
stage it needs that is missing (tokenizer, then behavior). A stage is *complete* when its run
directory holds ``DONE`` (written atomically after a successful fit, naming the checkpoint); a stage
with ``checkpoints/last.ckpt`` but no ``DONE`` was interrupted and resumes from that checkpoint.
Extra arguments after ``--`` go to ``whale fit`` unchanged (e.g. ``--trainer.devices 8``).
"""

from __future__ import annotations

import argparse
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
    return (stage_dir(scale, stage) / "DONE").exists()


def _mark_done(run_dir: Path, info: dict) -> None:
    tmp = run_dir / "DONE.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "DONE")


def fmt_elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:d}:{s:02d}"


def run_stage(scale: str, stage: str, extra: list[str] | None = None, force: bool = False) -> Path:
    """Train one stage unless complete; resume from ``last.ckpt`` when a previous run was cut off."""
    run_dir = stage_dir(scale, stage)
    cfg = stage_config(scale, stage)
    if is_complete(scale, stage) and not force:
        print(f"[whale] {stage}: complete ({run_dir / 'DONE'}), reusing it", flush=True)
        return run_dir
    if force and (run_dir / "DONE").exists():
        (run_dir / "DONE").unlink()
    cmd = [sys.executable, "-m", "whale_pl.cli", "fit", "--config", str(cfg)]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists() and not force:
        print(f"[whale] {stage}: resuming interrupted run from {last}", flush=True)
        cmd += ["--ckpt_path", str(last)]
    cmd += list(extra or [])
    print(f"[whale] {stage}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[whale] {stage}: training failed (exit {proc.returncode}); rerun to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    _mark_done(run_dir, {"stage": stage, "scale": scale, "config": str(cfg), "seconds": time.time() - t0})
    print(f"[whale] {stage}: done in {fmt_elapsed(time.time() - t0)}", flush=True)
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
