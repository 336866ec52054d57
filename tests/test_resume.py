"""A training process killed mid-run resumes from its last checkpoint at the step it had reached."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_cli import ROOT, SHRINK


def _events_steps(run: Path) -> list[list[int]]:
    """Steps of `train/loss` in each TensorBoard event file of a run, oldest file first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for f in sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        out.append([e.step for e in acc.Scalars("train/loss")] if "train/loss" in tags else [])
    return out


@pytest.mark.ddp
def test_killed_fit_resumes_at_the_same_step(tiny_data_yaml, tmp_path):
    cfg = str(ROOT / "stages" / "demo" / "tokenizer.yaml")
    common = ["-m", "whale_pl.cli", "fit", "--config", cfg, "--data.init_args.config", str(tiny_data_yaml),
              "--trainer.logger.init_args.save_dir", str(tmp_path), *SHRINK, "--trainer.log_every_n_steps", "1",
              "--trainer.max_steps", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last = tmp_path / "tokenizer" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            except Exception:  # being replaced right now; Lightning renames complete files into place
                step = 0
            if step >= 4:
                break
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.kill()  # SIGKILL: no teardown, like a crash or a pre-empted node
    proc.wait()
    saved = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= saved < 400

    target = saved + 4
    resume = [a if a != "400" else str(target) for a in common] + ["--ckpt_path", str(last)]
    done = subprocess.run([sys.executable, *resume], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == target
    resumed_steps = _events_steps(tmp_path / "tokenizer")[-1]
    assert resumed_steps and min(resumed_steps) >= saved, (saved, resumed_steps)  # continued, not restarted
