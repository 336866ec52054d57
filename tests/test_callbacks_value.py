"""The value hook renders in a child process, so forked DataLoader workers that render afterwards
in a later epoch do not hang (a forked worker that renders hangs if the parent rendered: README, Troubleshooting)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from whale_pl.callbacks import EvalCallback


def render_value(ckpt_path: str, task: str = "reach-v3") -> dict:
    """A value function in the hook's shape: reads the checkpoint and renders the simulator."""
    from whale_pl.data.metaworld import MetaWorldEnv

    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    env = MetaWorldEnv(task, 32, "corner2")
    try:
        env.reset(0)
        frame = env.render()
    finally:
        env.close()
    return {"param_sum": float(sum(v.sum() for v in state.values())), "frame_mean": float(frame.mean()),
            "pid": os.getpid(), "note": "strings are dropped"}


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


def test_value_hook_runs_in_a_child_and_forked_rendering_workers_do_not_hang(tmp_path):
    cb = EvalCallback(num_clips=2, fvd=False, value_fn="test_callbacks_value:render_value",
                      value_kwargs={"task": "reach-v3"})
    module = ValueModule()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, limit_train_batches=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=CSVLogger(tmp_path), callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = DataLoader([{"frames": torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)}] * 4, batch_size=2)
    trainer.fit(module, data, data)
    (record,) = [json.loads(x) for x in open(f"{trainer.log_dir}/metrics.jsonl")]
    assert record["value/pid"] != os.getpid() and 0 < record["value/frame_mean"] < 255
    assert "value/note" not in record
    expected = float(sum(v.sum() for v in module.state_dict().values()))
    assert record["value/param_sum"] == pytest.approx(expected, rel=1e-5)
    assert not any((tmp_path / ".eval_tmp").glob("*.ckpt")) if (tmp_path / ".eval_tmp").exists() else True
    # the simulator rendered in the child only: a worker forked now can still render
    batches = rendered_batches_in_forked_worker()
    assert len(batches) == 2 and batches[0]["frames"].shape == (2, 2, 3, 16, 16)


def test_value_gap_required_but_unsupported_is_an_error(tmp_path):
    class Plain(ValueModule):
        supports_value_eval = False

    cb = EvalCallback(num_clips=2, fvd=False, value_gap=True, value_fn="test_callbacks_value:render_value")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", limit_train_batches=1, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = DataLoader([{"frames": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}] * 2, batch_size=2)
    with pytest.raises(RuntimeError, match="supports_value_eval=False"):
        trainer.fit(Plain(), data, data)


def checkpoint_value(ckpt_path: str) -> dict:
    """A non-rendering value function: the sum of the checkpoint's parameters."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {"param_sum": float(sum(v.sum() for v in state.values()))}


DDP_SCRIPT = """
import json, sys, torch, lightning as L
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_callbacks_value import ValueModule
from whale_pl.callbacks import EvalCallback

cb = EvalCallback(num_clips=3, fvd=False, value_fn="test_callbacks_value:checkpoint_value")
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
