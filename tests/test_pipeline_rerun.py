"""A forced retrain never leaves a stale checkpoint for later stages: the old run directory is moved
aside (never deleted), DONE names the checkpoint the fit wrote with its sha256, and a later stage is
handed exactly that file, or refuses to run when it has changed since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from whale_pl import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_scale(tmp_path, tiny_data_yaml, monkeypatch):
    """``stages/tiny/tokenizer.yaml``: the demo tokenizer config at tiny size on the tiny dataset, 2 steps."""
    cfg = yaml.safe_load((ROOT / "stages" / "demo" / "tokenizer.yaml").read_text())
    cfg["model"]["init_args"]["net"].update(frame_size=[32, 32], dim=32, enc_depth=1, dec_depth=1, heads=2,
                                            codebook_size=32, code_dim=8)
    cfg["data"]["init_args"].update(config=str(tiny_data_yaml), num_workers=0, steps_per_epoch=2, val_steps=1,
                                    val_clip_len=4)
    cfg["trainer"].update(max_steps=2, enable_progress_bar=False, precision="32-true")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = "runs/tiny"
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "EvalCallback" not in c["class_path"]]
    (tmp_path / "stages" / "tiny").mkdir(parents=True)
    (tmp_path / "stages" / "tiny" / "tokenizer.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_forced_retrain_moves_the_old_run_aside_and_later_stages_get_the_new_checkpoint(tiny_scale):
    run = pipeline.run_stage("tiny", "tokenizer")
    first = json.loads((run / "DONE").read_text())
    assert Path(first["checkpoint"]) == run / "checkpoints" / "best.ckpt"
    (run / "checkpoints" / "marker.txt").write_text("from the first run")
    pipeline.run_stage("tiny", "tokenizer", force=True)
    aside = [p for p in (tiny_scale / "runs" / "tiny").iterdir() if p.name.startswith("tokenizer.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "marker.txt").exists()  # moved, not deleted
    assert not (run / "checkpoints" / "marker.txt").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("best*.ckpt")) == ["best.ckpt"]  # no best-v1
    done = json.loads((run / "DONE").read_text())
    assert done["sha256"] == pipeline.sha256_of(Path(done["checkpoint"]))
    assert pipeline.handoff_args("tiny", ("tokenizer",)) == ["--model.init_args.tokenizer_ckpt", done["checkpoint"]]
    with open(done["checkpoint"], "ab") as f:  # the file changes after the stage finished
        f.write(b"\0")
    with pytest.raises(SystemExit, match=r"best\.ckpt.*has changed since the stage finished"):
        pipeline.handoff_args("tiny", ("tokenizer",))
