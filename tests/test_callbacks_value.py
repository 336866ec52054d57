"""The value hook: the callback hands it a temporary checkpoint and logs its figures; it renders in a child
process, so forked DataLoader workers that render afterwards do not hang (a forked worker that renders hangs if
the parent rendered: README, Troubleshooting)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from whale_pl import callbacks
from whale_pl.callbacks import EvalCallback, run_value_hook


class RenderedClips(Dataset):
    """Each item renders a Meta-World frame in the DataLoader worker (one env per worker)."""

    env = None

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        if RenderedClips.env is None:
            from whale_pl.data.metaworld import MetaWorldEnv

            RenderedClips.env = MetaWorldEnv("reach-v3", 16, "corner2")
            RenderedClips.env.reset(i)
        frame = torch.from_numpy(RenderedClips.env.render().copy())  # [H, W, 3] uint8
        return {"frames": frame.permute(2, 0, 1)[None].repeat(2, 1, 1, 1)}


class ValueModule(L.LightningModule):
    supports_value_eval = True

    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(3, 3, 1)

    def _recon(self, x):
        return torch.tanh(self.net(x.flatten(0, 1))).view_as(x)

    def training_step(self, batch, batch_idx):
        x = batch["frames"].float() / 127.5 - 1
        return (self._recon(x) - x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def eval_videos(self, batch):
        x = batch["frames"].float() / 127.5 - 1
        return x, self._recon(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rendered_batches_in_forked_worker() -> list[dict]:
    """Iterate a DataLoader whose forked worker renders; a hang becomes a timeout error (generous:
    a loaded CI box can take a minute to start a worker)."""
    return list(DataLoader(RenderedClips(), batch_size=2, num_workers=1, timeout=240,
                           multiprocessing_context="fork"))


def checkpoint_value(ckpt_path: str, kwargs: dict | None = None) -> dict:
    """A stand-in for the value hook: the sum of the checkpoint's parameters."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {"param_sum": float(sum(v.sum() for v in state.values()))}


def test_callback_hands_the_hook_a_temporary_checkpoint_and_logs_its_figures(tmp_path, monkeypatch):
    calls = []

    def hook(ckpt_path: str, kwargs: dict) -> dict:
        calls.append(kwargs)
        return checkpoint_value(ckpt_path)

    monkeypatch.setattr(callbacks, "run_value_hook", hook)
    cb = EvalCallback(num_clips=2, value_kwargs={"horizon": 3})
    module = ValueModule()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, limit_train_batches=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=CSVLogger(tmp_path), callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    data = DataLoader([{"frames": torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)}] * 4, batch_size=2)
    trainer.fit(module, data, data)
    (record,) = [json.loads(x) for x in open(f"{trainer.log_dir}/metrics.jsonl")]
    assert calls == [{"horizon": 3}]
    expected = float(sum(v.sum() for v in module.state_dict().values()))
    assert record["value/param_sum"] == pytest.approx(expected, rel=1e-5)
    assert not list((tmp_path / ".eval_tmp").glob("*.ckpt"))


@pytest.mark.filterwarnings("ignore:Constant")
def test_value_hook_renders_in_a_child_and_forked_rendering_workers_do_not_hang(tiny_dynamics, tiny_data_yaml):
    out = run_value_hook(str(tiny_dynamics[0]), {"data_config": str(tiny_data_yaml), "starts": 1, "horizon": 3})
    assert {"val_value_gap", "all_regret_at_1", "ood_params_value_gap"} <= set(out)
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    # the simulator rendered in the child only: a worker forked now can still render
    batches = rendered_batches_in_forked_worker()
    assert len(batches) == 2 and batches[0]["frames"].shape == (2, 2, 3, 16, 16)


DDP_SCRIPT = """
import json, sys, torch, lightning as L
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_callbacks_value import ValueModule, checkpoint_value
from whale_pl import callbacks
from whale_pl.callbacks import EvalCallback

callbacks.run_value_hook = checkpoint_value  # the launcher re-runs this script on every rank
cb = EvalCallback(num_clips=3)
data = DataLoader([{{"frames": torch.full((2, 3, 8, 8), 60 * i, dtype=torch.uint8)}} for i in range(4)], batch_size=1)
trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", limit_train_batches=2,
                    limit_val_batches=2, num_sanity_val_steps=0, logger=CSVLogger({out!r}, name="ddp"),
                    callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
module = ValueModule()
trainer.fit(module, data, data)
log_dir = trainer.log_dir  # a collective call under DDP: every rank
if trainer.is_global_zero:
    json.dump({{"log_dir": log_dir,
               "param_sum": float(sum(v.sum() for v in module.state_dict().values()))}},
              open({out!r} + "/result.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_evaluates_on_rank_zero_with_the_value_hook(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    records = [json.loads(x) for x in open(Path(result["log_dir"]) / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1]  # one line per evaluation, from rank 0 only
    assert all(r["num_clips"] == 2 for r in records)  # rank 0's share of the 4 validation clips (batch 1)
    assert records[-1]["value/param_sum"] == pytest.approx(result["param_sum"], rel=1e-5)
