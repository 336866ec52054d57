"""`make demo`: the whole pipeline at demo scale (data, stages, video metrics, GIFs, a one-seed experiment) and
``runs/<scale>/report.md``, reusing what is complete and resuming what was interrupted. The experiment's runs
train in a background process (log ``runs/<scale>/side_models.log``) from the end of the tokenizer step."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from whale_pl.pipeline import fmt_elapsed, run_stage, run_tokens

# one seed each way, two ensemble members, two start states per task (the step budget: experiment.STEPS)
EXPERIMENT_ARGS = ["--seeds", "1", "--members", "2", "--starts", "2"]


def _sh(cmd: list[str]) -> None:
    print("    $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] command failed (exit {proc.returncode}): {' '.join(cmd)}")


def build_steps(scale: str, side: dict | None = None) -> list[tuple]:
    """The demo's steps in order: (name, what runs it); ``side["proc"]``: the background experiment training."""
    import yaml

    py, run_root, side = sys.executable, Path("runs") / scale, {} if side is None else side
    data_cfg = Path("stages") / scale / "data.yaml"
    dynamics_ckpt = str(run_root / "dynamics" / "checkpoints" / "best.ckpt")
    log = run_root / "side_models.log"

    def tokenizer_then_side() -> None:
        """Stage 1 and the token shards alone on the machine, then the side models start."""
        run_stage(scale, "tokenizer")  # alone on the machine: all cores
        run_tokens(scale)  # the side models and stages 2 and 3 all read the token shards
        # from here two trainings share the cores: one thread each (OpenMP spin-waiting on an
        # oversubscribed CPU made steps several times slower)
        os.environ["OMP_NUM_THREADS"] = "1"
        cmd = [py, "-m", "whale_pl.experiment", "--scale", scale, *EXPERIMENT_ARGS, "--train-only", "--jobs", "2"]
        print(f"    $ {' '.join(cmd)} > {log} 2>&1 &   (background: the experiment's on and off runs)", flush=True)
        with open(log, "ab") as f:
            side["proc"] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def evaluate(cmd: str, *args: str) -> None:
        """``whale eval <cmd>`` of the stage dynamics model on the demo shards."""
        shards = str(yaml.safe_load(data_cfg.read_text())["out"])  # the shard directory the data step wrote
        _sh([py, "-m", "whale_pl.eval_cli", cmd, "--ckpt", dynamics_ckpt, "--shards", shards, *args])

    def experiment() -> None:
        """The one-seed experiment, once the side models are trained (it retrains whatever they failed to)."""
        if "proc" in side:
            t0, rc = time.time(), side.pop("proc").wait()
            print(f"    side models: finished (exit {rc}) after waiting {fmt_elapsed(time.time() - t0)}; log {log}",
                  flush=True)
        _sh([py, "-m", "whale_pl.experiment", "--scale", scale, *EXPERIMENT_ARGS])

    return [
        ("data", lambda: _sh([py, "-m", "whale_pl.data.cli", "metaworld", "--config", str(data_cfg)])),
        ("tokenizer", tokenizer_then_side),
        ("behavior", lambda: run_stage(scale, "behavior")),
        ("dynamics", lambda: run_stage(scale, "dynamics")),
        ("video metrics", lambda: evaluate("video", "--num-clips", "16", "--clip-len", "12",
                                           "--out", str(run_root / "video_metrics.json"))),
        ("rollout gifs", lambda: evaluate("gifs", "--out", str(run_root / "gifs"))),
        ("experiment", experiment),
        ("report", lambda: _sh([py, "-m", "whale_pl.report", "--scale", scale])),
    ]


def main(scale: str = "demo") -> None:
    """``python -m whale_pl.demo``: every step, resuming what exists."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    side: dict = {}
    steps = build_steps(scale, side)
    t_start = time.time()
    try:
        for i, (name, run) in enumerate(steps, 1):
            head, t0 = f"[demo {i}/{len(steps)}] {name}", time.time()
            print(f"{head}: started (total {fmt_elapsed(t0 - t_start)})", flush=True)
            run()
            print(f"{head}: done in {fmt_elapsed(time.time() - t0)} (total {fmt_elapsed(time.time() - t_start)})",
                  flush=True)
    finally:
        if "proc" in side and side["proc"].poll() is None:  # an interrupted demo leaves no orphan training
            side["proc"].terminate()
            side["proc"].wait()
    print(f"[demo] all done in {fmt_elapsed(time.time() - t_start)}: report at "
          f"{Path('runs') / scale / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
