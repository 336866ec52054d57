"""No checkpoint a user hands over can run code: every entry point that reads one refuses a
checkpoint whose pickle would create a file, and the file is never created. Resume refuses another
stage's checkpoint; hand-off errors are printed last and alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from whale_pl.lit.handoff import HandoffError

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).parent / "reference" / "ckpt_v0"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing means the pickle ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint whose unpickling creates ``marker``, marker)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"data_spec": _CreatesFile(str(marker))},
                "whale_class": "whale_pl.lit.tokenizer_module.TokenizerModule"}, path)
    assert not marker.exists()
    return path, marker


def test_library_entry_points_refuse_a_checkpoint_that_would_run_code(evil, tmp_path):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.checkpoint import read_checkpoint
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.handoff import load_frozen
    from whale_pl.lit.init_from import init_from_checkpoint
    from whale_pl.lit.tokenizer_module import TokenizerModule
    from whale_pl.rollout.value import WorldModel, frame_stride_of

    path, marker = evil
    calls = [
        lambda: read_checkpoint(path),
        lambda: load_frozen(path, TokenizerModule),
        lambda: BehaviorModule(tokenizer_ckpt=str(path)),  # the hand-off of a stage config
        lambda: init_from_checkpoint(load_frozen(OLD / "tokenizer.ckpt", TokenizerModule), path),
        lambda: DynamicsModule.load_from_checkpoint(path),
        lambda: WorldModel.load(path),
        lambda: frame_stride_of(path),
    ]
    for call in calls:
        with pytest.raises(HandoffError, match="unpickle"):
            call()
        assert not marker.exists()


def test_a_checkpoint_naming_a_malicious_earlier_stage_is_refused(evil, tmp_path, monkeypatch):
    """The earlier stage named only inside another checkpoint's hyper-parameters is read safely too."""
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.handoff import load_frozen

    path, marker = evil
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(path, tmp_path / "tokenizer" / "last.ckpt")  # where the dynamics checkpoint's tokenizer_ckpt points
    (tmp_path / "behavior").mkdir()
    shutil.copy(OLD / "behavior.ckpt", tmp_path / "behavior" / "last.ckpt")
    shutil.copy(OLD / "dynamics.ckpt", tmp_path / "dyn.ckpt")
    with pytest.raises(HandoffError, match="unpickle"):
        load_frozen("dyn.ckpt", DynamicsModule)
    assert not marker.exists()


def _whale(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whale_pl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_command_lines_refuse_it_and_print_the_reason_last(evil, tmp_path):
    path, marker = evil
    runs = [
        ("fit", "--config", "stages/demo/tokenizer.yaml", "--ckpt_path", str(path), "--trainer.logger", "false"),
        ("eval", "video", "--ckpt", str(path), "--shards", str(tmp_path), "--out", str(tmp_path / "v.json")),
        ("eval", "gifs", "--ckpt", str(path), "--shards", str(tmp_path), "--out", str(tmp_path / "gifs")),
    ]
    for args in runs:
        proc = _whale(*args)
        assert proc.returncode != 0, args
        last = proc.stderr.strip().splitlines()[-1]
        assert "unpickle" in last and str(path) in last, (args, proc.stderr[-2000:])
        assert not marker.exists(), args


def test_resume_from_another_stage_is_refused_naming_both(tmp_path):
    proc = _whale("fit", "--config", "stages/demo/tokenizer.yaml", "--ckpt_path", str(OLD / "behavior.ckpt"),
                  "--trainer.logger", "false")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "BehaviorModule" in last and "TokenizerModule" in last, proc.stderr[-2000:]


def test_handoff_error_is_printed_last_and_alone():
    proc = _whale("fit", "--config", "stages/demo/behavior.yaml", "--model.init_args.tokenizer_ckpt",
                  str(OLD / "dynamics.ckpt"), "--trainer.logger", "false")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("whale: error: ") and "DynamicsModule" in lines[-1], proc.stderr[-2000:]
    assert lines[-2].strip() == "", "the project's error stands alone, after a blank line"
