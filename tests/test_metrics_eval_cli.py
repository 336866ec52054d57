"""`whale eval video` gives offline the figures the EvalCallback logged during training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from einops import rearrange
from torch import nn

from whale_pl.callbacks import EvalCallback
from whale_pl.data.datamodule import ClipDataModule
from whale_pl.eval_cli import evaluate_video, load_stage_module, main
from whale_pl.lit.handoff import HandoffError, stamp_class


class StampedAE(L.LightningModule):
    """Per-frame conv autoencoder that stamps its class and data_spec like the stage modules."""

    def __init__(self, data_spec: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def eval_videos(self, batch: dict):
        x = batch["frames"].float() / 127.5 - 1
        b = x.shape[0]
        y = torch.tanh(self.net(rearrange(x, "b t c h w -> (b t) c h w")))
        return x, rearrange(y, "(b t) c h w -> b t c h w", b=b)

    def training_step(self, batch, batch_idx):
        real, fake = self.eval_videos(batch)
        return (real - fake).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_save_checkpoint(self, checkpoint):
        stamp_class(checkpoint, self)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _dm(shards):
    return ClipDataModule(str(shards), clip_len=4, batch_size=2, num_workers=0, steps_per_epoch=2, val_steps=2,
                          seed=0)


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    dm = _dm(tiny_shards)
    dm.setup("fit")
    torch.manual_seed(0)
    module = StampedAE(data_spec=dm.data_spec)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, num_sanity_val_steps=0, logger=False,
                        default_root_dir=tmp, callbacks=[EvalCallback(num_clips=3)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp / "stamped.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, json.loads((tmp / "metrics.jsonl").read_text().splitlines()[-1]), module


def test_eval_video_reproduces_the_callback(trained, tiny_shards, tmp_path, capsys):
    ckpt, logged, _ = trained
    out = tmp_path / "sub" / "metrics.json"
    rc = main(["video", "--ckpt", str(ckpt), "--shards", str(tiny_shards), "--num-clips", "3", "--clip-len", "4",
               "--out", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["num_clips"] == 3 and got["stage"] == "StampedAE" and got["ckpt"] == str(ckpt)
    assert got["psnr"] == pytest.approx(logged["psnr"], rel=1e-6)
    assert got["ssim"] == pytest.approx(logged["ssim"], rel=1e-6)
    assert got["psnr_per_frame"] == pytest.approx(logged["psnr_per_frame"], rel=1e-6)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr"] == pytest.approx(got["psnr"])


def test_data_spec_mismatch_is_an_error(trained, tiny_shards):
    _, _, module = trained
    spec = dict(module.hparams.data_spec, frame_size=[64, 64])
    with pytest.raises(HandoffError, match=r"frame_size: checkpoint \[64, 64\] != current \[32, 32\]"):
        evaluate_video(StampedAE(data_spec=spec), tiny_shards, num_clips=2, clip_len=4)


def test_checkpoint_without_class_and_bad_subcommands(tmp_path, capsys):
    p = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(ValueError, match="plain.ckpt: no 'whale_class' entry"):
        load_stage_module(p)
    assert main(["bogus"]) == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--clip-len", "1"], "--num-clips must be >= 1 and --clip-len >= 2, got 64 and 1"),
    (["--num-clips", "0"], "--num-clips must be >= 1 and --clip-len >= 2, got 0 and 16"),
    (["--out", "."], "--out . is a directory"),
])
def test_bad_video_arguments_get_one_line_before_any_work(flags, message, tiny_shards, monkeypatch, capsys):
    import whale_pl.eval_cli as ec

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(ec, "load_stage_module", no_work)
    assert main(["video", "--ckpt", "x.ckpt", "--shards", str(tiny_shards), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"whale eval video: error: {message}"), err


def test_more_clips_than_the_split_holds_is_refused(trained, tiny_shards, tmp_path, capsys):
    ckpt, _, _ = trained
    dm = ClipDataModule(str(tiny_shards), clip_len=4, num_workers=0, rank=0, world_size=1)
    assert dm.val_clip_count() == 6 * (24 - 4 + 1)  # 6 val episodes of 24 frames: 21 starts each
    dm2 = ClipDataModule(str(tiny_shards), clip_len=4, frame_stride=3, num_workers=0, rank=0, world_size=1)
    assert dm2.val_clip_count() == 6 * (24 - 12 + 1)
    out = tmp_path / "m.json"
    assert main(["video", "--ckpt", str(ckpt), "--shards", str(tiny_shards), "--num-clips", "127", "--clip-len",
                 "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split 'val' holds 126 distinct clips of 4 frames at stride 1; --num-clips 127 would " \
        "repeat clips" in err[0], err
    assert not out.exists()
