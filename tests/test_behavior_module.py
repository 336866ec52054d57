"""BehaviorModule on real (tiny) Meta-World data: the whole `whale fit` path with the demo YAML (on token
shards, stage 3's clock), the frozen tokenizer bit-identical after the fit, checkpoints that stage 3 can
load, clear errors for missing / incompatible tokenizer checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from whale_pl.lit.handoff import HandoffError, load_frozen

TINY_TOKENIZER = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                      codebook_size=32, code_dim=8)


@pytest.fixture(scope="module")
def tokenizer_ckpt(tiny_data_yaml, tmp_path_factory) -> Path:
    """A real stage-1 checkpoint: a tiny tokenizer fitted for a few steps on the tiny dataset."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    out = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    dm = MetaWorldDataModule(config=str(tiny_data_yaml), clip_len=4, batch_size=2, num_workers=0,
                             steps_per_epoch=3, val_steps=1)
    module = TokenizerModule(net=TINY_TOKENIZER, optim=dict(warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=out, filename="best", save_last=False)])
    trainer.fit(module, dm)
    return out / "best.ckpt"


@pytest.fixture(scope="module")
def tokens_root(tokenizer_ckpt, tiny_shards, tmp_path_factory) -> Path:
    """The tiny dataset's token shards made with the fixture's tokenizer (``tokens:`` of the data section)."""
    from whale_pl.data.tokens import build_tokens

    root = tmp_path_factory.mktemp("tokens")
    build_tokens(tiny_shards, root / tiny_shards.name, tokenizer_ckpt)
    return root


def _fit_cli(tokenizer_ckpt: Path, data_yaml: Path, run_root: Path, tokens: Path) -> None:
    """`whale fit --config stages/demo/behavior.yaml` with tiny-data overrides (clock: every 2nd frame, as
    the tiny dynamics runs)."""
    from whale_pl.cli import main

    main([
        "fit", "--config", "stages/demo/behavior.yaml",
        "--model.init_args.tokenizer_ckpt", str(tokenizer_ckpt),
        "--model.init_args.expect_codebook_size", "32",
        "--model.init_args.net.dim", "32", "--model.init_args.net.decoder_hidden", "32",
        "--model.init_args.probe_t_min", "2",
        "--data.init_args.config", str(data_yaml), "--data.init_args.tokens", str(tokens),
        "--data.init_args.clip_len", "6", "--data.init_args.frame_stride", "2", "--data.init_args.retrace_clip_len", "3",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.steps_per_epoch", "4", "--data.init_args.val_steps", "2",
        "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run_root),
    ])


@pytest.fixture(scope="module")
def fitted(tokenizer_ckpt, tiny_data_yaml, tokens_root, tmp_path_factory):
    from whale_pl.lit.tokenizer_module import TokenizerModule

    before = load_frozen(tokenizer_ckpt, TokenizerModule).state_dict()
    before = {k: v.clone() for k, v in before.items()}
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    _fit_cli(tokenizer_ckpt, tiny_data_yaml, root, tokens_root)
    return root / "behavior", before


def test_fit_keeps_tokenizer_bit_identical_and_writes_checkpoints(fitted, tokenizer_ckpt):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.handoff import fingerprint as tokenizer_fingerprint

    run, before = fitted
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    raw = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["whale_class"].endswith("BehaviorModule")
    assert not any(k.startswith("tokenizer.") for k in raw["state_dict"])  # only path + fingerprint
    assert raw["hyper_parameters"]["tokenizer_ckpt"] == str(tokenizer_ckpt)
    assert raw["global_step"] == 8

    beh = load_frozen(ckpts / "last.ckpt", BehaviorModule)
    after = beh.tokenizer.state_dict()
    assert before.keys() == after.keys()
    assert any("codebook" in k or "embed" in k for k in before)  # the codebook is among what we compare
    for k in before:
        assert torch.equal(before[k], after[k]), f"tokenizer tensor {k} changed during the behavior fit"
    assert raw["hyper_parameters"]["tokenizer_sha256"] == tokenizer_fingerprint(beh.tokenizer)
    # and the tokenizer file on disk is untouched
    from whale_pl.lit.tokenizer_module import TokenizerModule

    on_disk = load_frozen(tokenizer_ckpt, TokenizerModule).state_dict()
    assert all(torch.equal(on_disk[k], before[k]) for k in before)
    # loaded for stage 3: frozen and in eval mode, the tokenizer inside it too
    assert all(not m.training for m in beh.modules())
    assert not any(p.requires_grad for p in beh.parameters())


def test_tokenizer_stays_in_eval_mode_during_fit(tokenizer_ckpt, tiny_data_yaml, tmp_path):
    """Lightning calls .train() on the whole module; the pinned tokenizer must stay in eval."""
    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.behavior_module import BehaviorModule

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.model.training, any(m.training for m in pl_module.tokenizer.modules()),
                         any(p.requires_grad for p in pl_module.tokenizer.parameters())))

    dm = MetaWorldDataModule(config=str(tiny_data_yaml), clip_len=12, batch_size=2, num_workers=0,
                             steps_per_epoch=2, val_steps=1)
    module = BehaviorModule(tokenizer_ckpt=str(tokenizer_ckpt), net=dict(dim=32, depth=1, z_dim=4, decoder_hidden=16),
                            optim=dict(warmup_steps=1), probe_t_min=4)
    L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, callbacks=[Spy()]).fit(module, dm)
    assert len(seen) == 4
    assert all(model_train and not tok_train and not tok_grad for model_train, tok_train, tok_grad in seen)


def test_pca_image_and_metrics_reach_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = fitted
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert "val/z_pca_by_family" in ea.Tags()["images"]
    for tag in ("train/action_mse", "train/kl", "val/action_mse", "val/kl", "val/action_mse_prior"):
        assert tag in ea.Tags()["scalars"], tag


def test_changed_tokenizer_file_is_rejected(fitted, tokenizer_ckpt, tmp_path):
    from whale_pl.lit.behavior_module import BehaviorModule

    run, _ = fitted
    tok_copy = tmp_path / "tokenizer.ckpt"
    ck = torch.load(tokenizer_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.endswith("weight"))
    ck["state_dict"][key] = ck["state_dict"][key] + 1e-3
    torch.save(ck, tok_copy)
    beh = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    beh["hyper_parameters"]["tokenizer_ckpt"] = str(tok_copy)
    torch.save(beh, tmp_path / "behavior.ckpt")
    with pytest.raises(HandoffError, match=r"tokenizer\.ckpt.*not the one this BehaviorModule was trained with"):
        load_frozen(tmp_path / "behavior.ckpt", BehaviorModule)


def test_bad_tokenizer_checkpoints_name_path_and_mismatch(fitted, tokenizer_ckpt, tmp_path):
    from whale_pl.lit.behavior_module import BehaviorModule

    run, _ = fitted
    missing = tmp_path / "nope" / "best.ckpt"
    with pytest.raises(HandoffError, match=r"nope/best\.ckpt.*does not exist"):
        BehaviorModule(tokenizer_ckpt=str(missing))
    # another stage's checkpoint where the tokenizer's should be
    wrong = run / "checkpoints" / "last.ckpt"
    with pytest.raises(HandoffError, match=r"last\.ckpt.*holds a whale_pl\.lit\.behavior_module\.BehaviorModule, "
                                           r"expected a whale_pl\.lit\.tokenizer_module\.TokenizerModule"):
        BehaviorModule(tokenizer_ckpt=str(wrong))
    with pytest.raises(HandoffError, match=r"best\.ckpt.*codebook_size is 32, expected 1024"):
        BehaviorModule(tokenizer_ckpt=str(tokenizer_ckpt), expect_codebook_size=1024)
    spec = dict(torch.load(tokenizer_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["data_spec"])
    spec["frame_size"] = [64, 64]
    with pytest.raises(HandoffError, match=r"best\.ckpt.*frame_size: checkpoint \[32, 32\] != current \[64, 64\]"):
        BehaviorModule(tokenizer_ckpt=str(tokenizer_ckpt), data_spec=spec)


def test_fit_records_the_clock_and_token_shards_of_another_tokenizer_are_refused(fitted, tokenizer_ckpt, tokens_root,
                                                                              tiny_data_yaml, tmp_path):
    """The checkpoint records stage 3's clock (frame stride, retracing strides); a fit on token shards that
    another tokenizer made stops before training, naming both tokenizers."""
    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.data.tokens import TokenError
    from whale_pl.lit.behavior_module import BehaviorModule

    run, _ = fitted
    spec = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"][
        "data_spec"]
    assert spec["frame_stride"] == 2 and spec["retrace_strides"] == [2, 3]
    other = tmp_path / "other.ckpt"
    ck = torch.load(tokenizer_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.endswith("weight"))
    ck["state_dict"][key] = ck["state_dict"][key] + 1e-3
    torch.save(ck, other)
    module = BehaviorModule(tokenizer_ckpt=str(other), net=dict(dim=16, depth=1, z_dim=4, decoder_hidden=16))
    dm = MetaWorldDataModule(config=str(tiny_data_yaml), tokens=str(tokens_root), clip_len=4, batch_size=2,
                             num_workers=0, steps_per_epoch=1, val_steps=1)
    with pytest.raises(TokenError, match=r"made with another tokenizer: .*best\.ckpt \(weights sha256 [0-9a-f]{16}\.\.\.\) "
                                         r"!= this stage's \([0-9a-f]{16}\.\.\.\)"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False).fit(module, dm)


def test_decoder_prev_action_reaches_the_model(tokenizer_ckpt):
    from whale_pl.lit.behavior_module import BehaviorModule

    on = BehaviorModule(str(tokenizer_ckpt), net=dict(dim=32, decoder_hidden=32, z_dim=16, decoder_prev_action=True))
    off = BehaviorModule(str(tokenizer_ckpt), net=dict(dim=32, decoder_hidden=32, z_dim=16))
    assert on.model.decoder_prev_action and not off.model.decoder_prev_action
    assert on.model.decoder[0].in_features == off.model.decoder[0].in_features + 4  # + a_{t-1}


def test_checkpoints_with_retired_options_load_when_neutral_and_name_them_otherwise(fitted, tmp_path):
    """A checkpoint of an earlier version that recorded a retired option at its neutral value loads; one trained
    with a retired option on fails with an error naming that option."""
    from whale_pl.lit.behavior_module import BehaviorModule

    run, _ = fitted
    raw = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    raw["hyper_parameters"].update(action_likelihood="gaussian", encoder_stats=False, change_decode=0.0, window=4)
    torch.save(raw, tmp_path / "neutral.ckpt")
    assert load_frozen(tmp_path / "neutral.ckpt", BehaviorModule).model.z_dim == raw["hyper_parameters"]["net"]["z_dim"]
    raw["hyper_parameters"].update(encoder_stats=["moments"])
    torch.save(raw, tmp_path / "retired.ckpt")
    with pytest.raises(HandoffError, match=r"trained with encoder_stats=\['moments'\], an option BehaviorModule no longer"):
        load_frozen(tmp_path / "retired.ckpt", BehaviorModule)


def test_probe_benchmark_runs_every_report_and_ends_with_its_figure(fitted, tiny_data_yaml, capsys):
    """``benchmarks/behavior_probe.py`` on a fitted checkpoint: every optional report prints, and the last line is
    ``behavior_probe_acc: <value> fraction`` with the val accuracy of the headline line."""
    import importlib.util
    import re

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "behavior_probe.py"
    spec = importlib.util.spec_from_file_location("bench_behavior_probe", path)
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    run, _ = fitted
    bp.main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data-config", str(tiny_data_yaml), "--clip-len", "6",
             "--hop", "3", "--t-min", "2", "--by-policy", "--by-episode", "--layout", "--posterior"])
    lines = capsys.readouterr().out.strip().splitlines()
    for what in ("val accuracy per family", "val points by policy", "val episodes:", "posterior mean", "layout:"):
        assert any(what in line for line in lines), what
    m = re.fullmatch(r"behavior_probe_acc: (\d\.\d{3}) fraction", lines[-1])
    assert m and f"val (held-out episodes) {m.group(1)}" in lines[0]
