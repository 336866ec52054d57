"""Run the stages in order, reusing what is complete (``DONE``) and resuming what was interrupted:
``python -m whale_pl.pipeline tokenizer|tokens|behavior|dynamics --scale S [--force] [-- whale fit arguments]``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from whale_pl.io import sha256_file as sha256_of, write_text_atomic

STAGES = ("tokenizer", "behavior", "dynamics")  # the trained stages (run directories with DONE)
TARGETS = ("tokenizer", "tokens", "behavior", "dynamics")  # what the command line builds


def stage_config(scale: str, stage: str) -> Path:
    """The config of a stage at a scale, ``stages/<scale>/<stage>.yaml``."""
    cfg = Path("stages") / scale / f"{stage}.yaml"
    if not cfg.exists():
        avail = sorted(p.name for p in Path("stages").iterdir() if p.is_dir()) if Path("stages").exists() else []
        raise FileNotFoundError(f"no config {cfg} for stage '{stage}' at scale '{scale}' (scales: {avail})")
    return cfg


def done_checkpoint(scale: str, stage: str) -> Path:
    """The checkpoint a finished stage's ``DONE`` names, checked against the sha256 recorded there."""
    done = Path("runs") / scale / stage / "DONE"
    info = json.loads(done.read_text())
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


def run_fit(cmd: list[str], run_dir: Path, tag: str) -> tuple[Path, float]:
    """Run ``whale fit``, resuming from ``last.ckpt``: (the newest ``best*.ckpt``, else ``last.ckpt``; seconds)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = cmd + (["--ckpt_path", str(last)] if last.is_file() else [])
    print(f"[{tag}] {run_dir}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[{tag}] training {run_dir} failed (exit {proc.returncode}); rerun to resume")
    best = sorted((run_dir / "checkpoints").glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    return (best or [last])[-1], time.time() - t0


def handoff_args(scale: str, stages: tuple[str, ...]) -> list[str]:
    """``--model.init_args.<stage>_ckpt <checkpoint>`` of each finished stage, as its DONE names it."""
    return [x for st in stages for x in (f"--model.init_args.{st}_ckpt", str(done_checkpoint(scale, st)))]


def _data_args(cfg: Path) -> dict:
    import yaml

    return dict((yaml.safe_load(cfg.read_text()).get("data") or {}).get("init_args") or {})


def _token_sources(scale: str) -> list[str]:
    """Every dataset directory (a Meta-World config's ``out``, or ``dirs``) the scale's stages read as tokens."""
    import yaml

    out: list[str] = []
    for args in (_data_args(stage_config(scale, stage)) for stage in ("behavior", "dynamics")):
        if args.get("tokens") is not None:
            dirs = [yaml.safe_load(Path(args["config"]).read_text())["out"]] if "config" in args else args["dirs"]
            out += [str(d) for d in ([dirs] if isinstance(dirs, str) else dirs) if str(d) not in out]
    return out


def run_tokens(scale: str, force: bool = False) -> Path:
    """Build (or resume, or reuse) the scale's token shards with the tokenizer stage's checkpoint."""
    import torch

    from whale_pl.data.shards import MANIFEST
    from whale_pl.data.tokens import TokenError, build_tokens

    out = Path("runs") / scale / "tokens"  # one token dataset per dataset directory, under its name
    if force and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"[whale] tokens --force under torchrun: every rank would move {out} aside; move it aside "
                         "once yourself, then run without --force")
    if force:
        _move_aside(out)
    ckpt = done_checkpoint(scale, "tokenizer")
    workers = 1 if torch.cuda.is_available() else 2
    for src in _token_sources(scale):
        dst = out / Path(src).name
        if (dst / MANIFEST).exists():
            print(f"[whale] tokens: {dst} complete, checking it", flush=True)
        else:
            print(f"[whale] tokens: {src} -> {dst} ({workers} worker(s), tokenizer {ckpt})", flush=True)
        t0 = time.time()
        try:
            m = build_tokens(src, dst, ckpt, workers=workers)
        except TokenError as e:
            raise SystemExit(f"[whale] tokens: {e}") from None
        if m is not None:
            print(f"[whale] tokens: {dst}: {m['frames']} frames of {m['episodes']} episodes "
                  f"({fmt_elapsed(time.time() - t0)})", flush=True)
    return out


def run_stage(scale: str, stage: str, extra: list[str] | None = None, force: bool = False) -> Path:
    """Train one stage unless complete; resume an interrupted run from ``last.ckpt``; ``force`` starts clean."""
    run_dir = Path("runs") / scale / stage
    cfg = stage_config(scale, stage)
    if (run_dir / "DONE").exists() and not force:
        print(f"[whale] {stage}: complete ({run_dir / 'DONE'}), reusing it", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "whale_pl.cli", "fit", "--config", str(cfg),
           *handoff_args(scale, STAGES[: STAGES.index(stage)])]
    if stage != "tokenizer" and _data_args(cfg).get("tokens") is not None:  # reads token shards
        cmd += ["--data.init_args.tokens", str(run_tokens(scale))]
    if force or not (run_dir / "checkpoints" / "last.ckpt").exists():  # else resume the interrupted run
        _move_aside(run_dir)
    ckpt, seconds = run_fit(cmd + list(extra or []), run_dir, "whale")
    write_text_atomic(run_dir / "DONE", json.dumps({"stage": stage, "scale": scale, "config": str(cfg), "seconds":
                      seconds, "checkpoint": str(ckpt), "sha256": sha256_of(ckpt)}, indent=2))
    print(f"[whale] {stage}: done in {fmt_elapsed(seconds)} -> {ckpt}", flush=True)
    return run_dir


def run_until(scale: str, target: str, extra: list[str] | None = None, force: bool = False) -> None:
    """Build every stage up to ``target``: missing earlier stages first, then ``target`` itself."""
    if target == "tokens":
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one of several ranks never trains the tokenizer
            run_stage(scale, "tokenizer")
        run_tokens(scale, force=force)
        return
    upto = STAGES.index(target)
    for i, stage in enumerate(STAGES[: upto + 1]):
        last_one = i == upto
        run_stage(scale, stage, extra=extra if last_one else None, force=force and last_one)


def main(argv: list[str] | None = None) -> None:
    """The command line: build the named stage and whatever it needs first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m whale_pl.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=TARGETS)
    p.add_argument("--scale", default="demo")
    p.add_argument("--force", action="store_true", help="retrain the named stage even if complete")
    a = p.parse_args(argv)
    run_until(a.scale, a.stage, extra=extra, force=a.force)


if __name__ == "__main__":
    main()
