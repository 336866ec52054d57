"""`make demo`: the whole pipeline end to end at demo scale, then a report.

Collects the Meta-World demo dataset, trains tokenizer -> behavior -> dynamics, evaluates video
fidelity, writes real-against-imagined rollout GIFs, runs the headline experiment and writes
``runs/<scale>/report.md``.
Every step reuses what is complete and resumes what was interrupted, so running it again is cheap.
One progress line per step, with elapsed time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from whale_pl.pipeline import fmt_elapsed, run_stage, stage_dir


@dataclass
class Step:
    name: str
    needs_module: str  # the step is built when this module is importable
    run: Callable[[], None]


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _sh(cmd: list[str]) -> None:
    print("    $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] command failed (exit {proc.returncode}): {' '.join(cmd)}")


def _data_out(data_cfg: Path) -> str:
    """The shard directory a dataset config writes (its ``out`` key)."""
    import yaml

    return str(yaml.safe_load(data_cfg.read_text())["out"])


def build_steps(scale: str) -> list[Step]:
    py = sys.executable
    run_root = Path("runs") / scale
    data_cfg = Path("stages") / scale / "data.yaml"
    steps = [
        Step("data", "whale_pl.data.metaworld",
             lambda: _sh([py, "-m", "whale_pl.data.cli", "metaworld", "--config", str(data_cfg)])),
        Step("tokenizer", "whale_pl.lit.tokenizer_module", lambda: run_stage(scale, "tokenizer")),
        Step("behavior", "whale_pl.lit.behavior_module", lambda: run_stage(scale, "behavior")),
        Step("dynamics", "whale_pl.lit.dynamics_module", lambda: run_stage(scale, "dynamics")),
        Step("video metrics", "whale_pl.eval_cli",
             lambda: _sh([py, "-m", "whale_pl.eval_cli", "video",
                          "--ckpt", str(stage_dir(scale, "dynamics") / "checkpoints" / "best.ckpt"),
                          "--shards", _data_out(data_cfg), "--num-clips", "16",
                          "--out", str(run_root / "video_metrics.json")])),
        Step("rollout gifs", "whale_pl.rollout.gifs",
             lambda: _sh([py, "-m", "whale_pl.rollout.gifs",
                          "--ckpt", str(stage_dir(scale, "dynamics") / "checkpoints" / "best.ckpt"),
                          "--shards", _data_out(data_cfg), "--out", str(run_root / "gifs")])),
        Step("experiment", "whale_pl.experiment",
             lambda: _sh([py, "-m", "whale_pl.experiment", "--scale", scale])),
        Step("report", "whale_pl.report",
             lambda: _sh([py, "-m", "whale_pl.report", "--scale", scale])),
    ]
    return steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m whale_pl.demo", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    a = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    steps = build_steps(a.scale)
    t_start = time.time()
    missing = [s.name for s in steps if not _have(s.needs_module)]
    for i, step in enumerate(steps, 1):
        head = f"[demo {i}/{len(steps)}] {step.name}"
        if step.name in missing:
            print(f"{head}: not built yet in this version of whale_pl — skipped", flush=True)
            continue
        t0 = time.time()
        print(f"{head}: started (total {fmt_elapsed(t0 - t_start)})", flush=True)
        step.run()
        print(f"{head}: done in {fmt_elapsed(time.time() - t0)} (total {fmt_elapsed(time.time() - t_start)})",
              flush=True)
    if missing:
        print(f"[demo] finished what exists; not built yet: {', '.join(missing)}", flush=True)
    else:
        print(f"[demo] all done in {fmt_elapsed(time.time() - t_start)}: report at "
              f"{Path('runs') / a.scale / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
