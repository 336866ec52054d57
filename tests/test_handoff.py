"""Stage hand-off: a frozen stage-1 tokenizer stays bit-identical (weights and buffers, codebook
EMA statistics included) through a later stage's fit, and bad checkpoints fail with clear errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whale_pl.data.datamodule import ClipDataModule
from whale_pl.lit.handoff import HandoffError, freeze_, load_frozen, stamp_class
from whale_pl.lit.optim import adamw_warmup_cosine
from whale_pl.lit.tokenizer_module import TokenizerModule

TINY_TOK = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                codebook_size=32, code_dim=8, ema_decay=0.5)


def _dm(shards: Path) -> ClipDataModule:
    return ClipDataModule(dirs=[str(shards)], clip_len=4, batch_size=2, num_workers=0, steps_per_epoch=3, val_steps=1)


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def tok_ckpt(tiny_shards, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = TokenizerModule(net=TINY_TOK, optim=dict(lr=3e-3, warmup_steps=1))
    trainer = _trainer(max_steps=2)
    trainer.fit(module, _dm(tiny_shards))
    path = tmp_path_factory.mktemp("handoff") / "tokenizer.ckpt"
    trainer.save_checkpoint(path)
    return path


class Probe(L.LightningModule):
    """A stand-in later stage: runs the tokenizer's *training* forward path (which would update the
    EMA codebook and restart codes if the tokenizer were in train mode) and trains a small head."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.head = nn.Linear(TINY_TOK["code_dim"], 4)
        self.seen_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        x = batch["frames"].float() / 127.5 - 1
        self.seen_modes.append(self.tokenizer.training)
        out = self.tokenizer.model(x)  # training path of the VQ-VAE
        codes = self.tokenizer.model.embed(out.ids_BThw).mean(dim=(2, 3))  # [B, T, C]
        return F.mse_loss(self.head(codes), batch["actions"]) + 0 * out.recon_BTCHW.mean()

    def validation_step(self, batch, batch_idx):
        self.tokenizer.model.encode(batch["frames"].float() / 127.5 - 1)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, lr=1e-2, warmup_steps=1)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_frozen_tokenizer_is_bit_identical_after_parent_fit(tok_ckpt, tiny_shards):
    tok = load_frozen(tok_ckpt, TokenizerModule)
    assert tok.model.codebook_size == 32 and tuple(tok.model.frame_size) == (32, 32)
    assert not tok.training
    assert not any(p.requires_grad for p in tok.parameters())
    before = _snapshot(tok)
    assert any("ema_sum" in k for k in before) and any("ema_count" in k for k in before)
    probe = Probe(tok)
    head_before = probe.head.weight.detach().clone()
    probe.train()  # what Lightning does; the frozen part must stay in eval
    assert not tok.training and not any(m.training for m in tok.modules())
    _trainer(max_steps=6).fit(probe, _dm(tiny_shards))
    assert probe.seen_modes and not any(probe.seen_modes)
    after = tok.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed in the frozen tokenizer"
    assert not torch.equal(head_before, probe.head.weight)  # the parent did train


def test_without_freezing_the_same_fit_changes_the_codebook(tok_ckpt, tiny_shards):
    """Control: the probe above really would change the tokenizer if it were not frozen."""
    tok = TokenizerModule.load_from_checkpoint(tok_ckpt, map_location="cpu")
    for p in tok.parameters():
        p.requires_grad_(False)
    tok.eval()  # eval alone is not enough: any .train() on the parent undoes it
    before = _snapshot(tok)
    probe = Probe(tok)
    probe.train()
    _trainer(max_steps=3).fit(probe, _dm(tiny_shards))
    assert all(probe.seen_modes)
    changed = [k for k, v in tok.state_dict().items() if not torch.equal(before[k], v)]
    assert any("quantizer" in k for k in changed), changed


def test_freeze_survives_pickle_and_deepcopy():
    import copy
    import pickle

    m = freeze_(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        clone.train()
        assert not clone.training and not clone[1].training


def test_handoff_errors_name_path_and_mismatch(tok_ckpt, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(HandoffError, match=r"nope\.ckpt.*does not exist"):
        load_frozen(missing, TokenizerModule)
    # a checkpoint of another class
    probe = Probe(nn.Identity())
    trainer = _trainer(1)
    trainer.strategy.connect(probe)
    other = tmp_path / "probe.ckpt"
    ckpt = {"state_dict": probe.state_dict(), "pytorch-lightning_version": L.__version__, "hyper_parameters": {}}
    stamp_class(ckpt, probe)
    torch.save(ckpt, other)
    with pytest.raises(HandoffError, match=r"probe\.ckpt.*holds a .*Probe, expected a whale_pl\.lit\.tokenizer_module\.TokenizerModule"):
        load_frozen(other, TokenizerModule)
    # unstamped checkpoint of a different model: the strict load names it
    del ckpt["whale_class"]
    torch.save(ckpt, other)
    with pytest.raises(HandoffError, match=r"probe\.ckpt.*does not load into .*TokenizerModule"):
        load_frozen(other, TokenizerModule)
    spec = torch.load(tok_ckpt, weights_only=True)["hyper_parameters"]["data_spec"]
    with pytest.raises(HandoffError, match=r"tokenizer\.ckpt.*frame_size: checkpoint \[32, 32\] != current \[64, 64\]"):
        load_frozen(tok_ckpt, TokenizerModule, data_spec={**spec, "frame_size": [64, 64]})
    # the matching spec passes
    load_frozen(tok_ckpt, TokenizerModule, data_spec=spec)
