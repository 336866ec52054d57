"""TokenizerModule under a real Trainer on the tiny Meta-World shards: checkpoints reload to
identical outputs, data_spec travels in the checkpoint, bad frame sizes fail before training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from whale_pl.data.datamodule import ClipDataModule
from whale_pl.lit.handoff import CLASS_KEY
from whale_pl.lit.tokenizer_module import TokenizerModule, usage_and_perplexity

TINY_TOK = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                codebook_size=32, code_dim=8)


def _dm(shards: Path) -> ClipDataModule:
    return ClipDataModule(dirs=[str(shards)], clip_len=4, batch_size=2, num_workers=0, steps_per_epoch=2, val_steps=1)


def _trainer(root: Path, max_steps: int, **kw) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=TensorBoardLogger(str(root), name="tok", version=""),
        callbacks=[ModelCheckpoint(filename="best", monitor="val/psnr", mode="max", save_last=True)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **kw,
    )


@pytest.fixture(scope="module")
def fitted(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_fit")
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = TokenizerModule(net=TINY_TOK, optim=dict(lr=3e-3, warmup_steps=1))
    dm = _dm(tiny_shards)
    _trainer(root, max_steps=4).fit(module, dm)
    return root / "tok", module, dm


def test_checkpoints_written_and_reload_identically(fitted):
    run, module, dm = fitted
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    assert last.is_file() and best.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt[CLASS_KEY] == "whale_pl.lit.tokenizer_module.TokenizerModule"
    assert ckpt["hyper_parameters"]["data_spec"]["frame_size"] == [32, 32]
    assert ckpt["global_step"] == 4
    reloaded = TokenizerModule.load_from_checkpoint(last, map_location="cpu").eval()
    module = module.eval()
    sd, sd2 = module.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:  # weights and buffers (codebook, EMA statistics) alike
        assert torch.equal(sd[k], sd2[k]), k
    batch = next(iter(dm.val_dataloader()))
    x = batch["frames"].float() / 127.5 - 1
    ids = module.model.encode(x)
    assert torch.equal(ids, reloaded.model.encode(x))
    assert torch.equal(module.model.decode(ids), reloaded.model.decode(ids))


def test_tensorboard_has_losses_metrics_usage_and_images(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = fitted
    acc = EventAccumulator(str(run))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ["train/mse", "train/commit", "val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity",
                "train/codebook_usage"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "val/originals_above_reconstructions" in acc.Tags()["images"]
    psnr = acc.Scalars("val/psnr")[-1].value
    assert 5 < psnr < 60


def test_resume_continues_from_last(fitted, tmp_path):
    run, _, dm = fitted
    module = TokenizerModule(net=TINY_TOK, optim=dict(lr=3e-3, warmup_steps=1))
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.fit(module, dm, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 6


def test_frame_size_mismatch_fails_before_training(tiny_shards, tmp_path):
    module = TokenizerModule(net={**TINY_TOK, "frame_size": [64, 64]})
    trainer = _trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"data frame_size \[32, 32\] differs from the tokenizer's configured frame_size \[64, 64\]"):
        trainer.fit(module, _dm(tiny_shards))
    assert trainer.global_step == 0


def test_usage_and_perplexity():
    assert usage_and_perplexity(torch.tensor([5, 5, 0, 0])) == pytest.approx((0.5, 2.0))
    assert usage_and_perplexity(torch.tensor([1, 1, 1, 1])) == pytest.approx((1.0, 4.0))


def test_eval_videos_protocol_and_offline_video_eval(fitted, tiny_shards, tmp_path):
    """The tokenizer serves the evaluation callback's protocol, so `whale eval video` takes its checkpoint."""
    import json

    from whale_pl.eval_cli import main as eval_main

    run, module, dm = fitted
    batch = next(iter(dm.val_dataloader()))
    real, recon = module.eval_videos(batch)
    assert real.shape == recon.shape == batch["frames"].shape
    assert torch.equal(recon, module.model.decode(module.model.encode(real)).float().clamp(-1, 1))
    out = tmp_path / "video.json"
    rc = eval_main(["video", "--ckpt", str(run / "checkpoints" / "best.ckpt"), "--shards", str(tiny_shards),
                    "--num-clips", "2", "--clip-len", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["num_clips"] == 2 and 5.0 < res["psnr"] < 100.0 and 0.0 < res["ssim"] <= 1.0


@pytest.mark.parametrize("option, value", [("sticky_margin", 0.02), ("encoder_spatial_radius", 0), ("l1_weight", 0.5)])
def test_checkpoints_with_a_retired_option_set_are_refused_by_name(fitted, tmp_path, option, value):
    """A checkpoint that holds a retired option at its inert value loads (as every old checkpoint did); one that
    set it otherwise fails at the hand-off, on a plain load and under ``init_from``, naming the option."""
    from whale_pl.lit.handoff import HandoffError, load_frozen
    from whale_pl.lit.init_from import init_from_checkpoint

    run, _, _ = fitted
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    inert = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], **TokenizerModule.RETIRED})
    torch.save(inert, tmp_path / "inert.ckpt")
    assert load_frozen(tmp_path / "inert.ckpt", TokenizerModule).model.codebook_size == 32
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], option: value}
    torch.save(ckpt, tmp_path / "retired.ckpt")
    with pytest.raises(HandoffError, match=f"trained with {option}={value!r}, an option TokenizerModule no longer has"):
        load_frozen(tmp_path / "retired.ckpt", TokenizerModule)
    with pytest.raises(HandoffError, match=f"trained with {option}={value!r}, an option TokenizerModule no longer has"):
        TokenizerModule.load_from_checkpoint(tmp_path / "retired.ckpt", map_location="cpu")
    with pytest.raises(HandoffError, match=f"trained with {option}={value!r}, an option TokenizerModule no longer has"):
        init_from_checkpoint(TokenizerModule(net=TINY_TOK), tmp_path / "retired.ckpt")
