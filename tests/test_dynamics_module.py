"""DynamicsModule on real (tiny) Meta-World data: the whole `whale fit` path with the demo YAML (token
shards) on real tiny tokenizer and behavior checkpoints of one clock; the frozen stages bit-identical
after the fit; validation figures and rollout pictures in TensorBoard; clear errors for mismatched data
and for a behavior prior trained on another clock."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from whale_pl.lit.handoff import HandoffError, load_frozen

TINY_TOKENIZER = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                      codebook_size=32, code_dim=8)
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0)
CLOCK = dict(frame_stride=2, retrace_strides=[2, 3], retrace_prob=0.2, retrace_clip_len=3)  # 24-frame tiny episodes


def _dm(data_yaml: Path, clip_len: int = 4, **kw):
    from whale_pl.data.datamodule import MetaWorldDataModule

    return MetaWorldDataModule(config=str(data_yaml), clip_len=clip_len, batch_size=2, num_workers=0,
                               steps_per_epoch=3, val_steps=1, **kw)


@pytest.fixture(scope="module")
def stage_ckpts(tiny_data_yaml, tmp_path_factory) -> tuple[Path, Path]:
    """Real stage-1 and stage-2 checkpoints, each fitted for a few steps on the tiny dataset (stage 2 on the
    clock of the stage-3 fits below)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    out = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    L.Trainer(max_steps=3, callbacks=[ModelCheckpoint(dirpath=out / "tok", filename="best")], **QUIET).fit(
        TokenizerModule(net=TINY_TOKENIZER, optim=dict(warmup_steps=1)), _dm(tiny_data_yaml))
    tok = out / "tok" / "best.ckpt"
    beh = BehaviorModule(tokenizer_ckpt=str(tok), net=dict(dim=16, depth=1, z_dim=4, decoder_hidden=16),
                         optim=dict(warmup_steps=1), probe_t_min=2)
    L.Trainer(max_steps=3, callbacks=[ModelCheckpoint(dirpath=out / "beh", filename="best")], **QUIET).fit(
        beh, _dm(tiny_data_yaml, clip_len=6, **CLOCK))
    return tok, out / "beh" / "best.ckpt"


@pytest.fixture(scope="module")
def tokens_root(stage_ckpts, tiny_shards, tmp_path_factory) -> Path:
    """The tiny dataset's token shards made with the stage-1 checkpoint."""
    from whale_pl.data.tokens import build_tokens

    root = tmp_path_factory.mktemp("tokens")
    build_tokens(tiny_shards, root / tiny_shards.name, stage_ckpts[0])
    return root


def _fit_cli(tok: Path, beh: Path, data_yaml: Path, run_root: Path, tokens: Path, extra: list[str] = ()) -> None:
    """`whale fit --config stages/demo/dynamics.yaml` with tiny-data overrides."""
    from whale_pl.cli import main

    main([
        "fit", "--config", "stages/demo/dynamics.yaml",
        "--model.init_args.tokenizer_ckpt", str(tok), "--model.init_args.behavior_ckpt", str(beh),
        "--model.init_args.net.dim", "32", "--model.init_args.net.depth", "1", "--model.init_args.net.heads", "2",
        "--model.init_args.sampling.maskgit_steps", "2", "--model.init_args.sampling.rollout_horizon", "4",
        "--model.init_args.sampling.rollout_batches", "1", "--model.init_args.optim.warmup_steps", "1",
        "--data.init_args.config", str(data_yaml), "--data.init_args.tokens", str(tokens),
        "--data.init_args.clip_len", "6", "--data.init_args.val_clip_len", "6",
        "--data.init_args.frame_stride", "2", "--data.init_args.retrace_clip_len", "3",  # 24-frame tiny episodes
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.steps_per_epoch", "3", "--data.init_args.val_steps", "2",
        "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run_root),
        *extra,
    ])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(stage_ckpts, tiny_data_yaml, tokens_root, tmp_path_factory):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok, beh = stage_ckpts
    before = {"tokenizer": _snapshot(load_frozen(tok, TokenizerModule)),
              "behavior": _snapshot(load_frozen(beh, BehaviorModule))}
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    _fit_cli(tok, beh, tiny_data_yaml, root, tokens_root)
    return root / "dynamics", before


def test_fit_keeps_frozen_stages_bit_identical(fitted, stage_ckpts):
    from whale_pl.lit.handoff import fingerprint as tokenizer_fingerprint
    from whale_pl.lit.dynamics_module import DynamicsModule

    run, before = fitted
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    raw = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["whale_class"].endswith("DynamicsModule") and raw["global_step"] == 6
    assert not any(k.startswith(("tokenizer.", "behavior.")) for k in raw["state_dict"])  # paths + sha256 only
    dyn = load_frozen(ckpts / "last.ckpt", DynamicsModule)
    for name, module in (("tokenizer", dyn.tokenizer), ("behavior", dyn.behavior)):
        after = module.state_dict()
        assert before[name].keys() == after.keys()
        for k in before[name]:
            assert torch.equal(before[name][k], after[k]), f"{name} tensor {k} changed during the dynamics fit"
    assert any("codebook" in k or "embed" in k for k in before["tokenizer"])
    assert raw["hyper_parameters"]["tokenizer_sha256"] == tokenizer_fingerprint(dyn.tokenizer)
    # the dynamics weights did train
    assert not torch.equal(raw["state_dict"]["model.logits_head.weight"],
                           DynamicsModule(tokenizer_ckpt=str(stage_ckpts[0]), behavior_ckpt=str(stage_ckpts[1]), net=dict(dim=32, depth=1, heads=2)).state_dict()["model.logits_head.weight"])


def test_frozen_stages_stay_in_eval_mode_during_fit(stage_ckpts, tiny_data_yaml):
    from whale_pl.lit.dynamics_module import DynamicsModule

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            frozen = [pl_module.tokenizer, pl_module.behavior]
            seen.append((pl_module.model.training, any(m.training for f in frozen for m in f.modules()),
                         any(p.requires_grad for f in frozen for p in f.parameters())))

    tok, beh = stage_ckpts
    module = DynamicsModule(tokenizer_ckpt=str(tok), behavior_ckpt=str(beh), net=dict(dim=32, depth=1, heads=2), optim=dict(warmup_steps=1), sampling=dict(rollout_horizon=2, rollout_batches=0))
    L.Trainer(max_steps=2, enable_checkpointing=False, callbacks=[Spy()], **QUIET).fit(module, _dm(tiny_data_yaml, **CLOCK))
    assert len(seen) == 2
    assert all(model_train and not frozen_train and not frozen_grad for model_train, frozen_train, frozen_grad in seen)


def test_validation_figures_and_rollout_picture_in_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = fitted
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert "val/rollout_real_vs_imagined" in ea.Tags()["images"]
    for tag in ("train/ce", "train/acc", "train/reward", "train/state", "val/acc", "val/ce", "val/copy_acc",
                "val/psnr_ar_all", "val/ssim_ar_all", "val/psnr_still_context"):
        assert tag in ea.Tags()["scalars"], tag
    assert "val/psnr_tokenizer_recon" not in ea.Tags()["scalars"]  # token batches: the real clip is the decoding
    assert any(t in ea.Tags()["scalars"] for t in ("val/psnr_ar_train_family", "val/psnr_ar_ood"))


def test_eval_videos_and_rollouts_from_pixels_and_from_tokens(fitted, tiny_data_yaml, tokens_root):
    """Frame batches are scored against the recorded frames (with the tokenizer's reconstruction beside them);
    the same clips from token shards roll out the same and are scored against the decoded real ids."""
    from whale_pl.lit.dynamics_module import DynamicsModule

    run, _ = fitted
    dyn = load_frozen(run / "checkpoints" / "last.ckpt", DynamicsModule)
    batch = next(iter(_dm(tiny_data_yaml, clip_len=6).val_dataloader()))
    real, imagined = dyn.eval_videos(batch)
    assert real.shape == imagined.shape == (2, 5, 3, 32, 32)  # the whole clip after the context (FVD wants >= 9)
    assert imagined.min() >= -1 and imagined.max() <= 1
    token_batch = next(iter(_dm(tiny_data_yaml, clip_len=6, tokens=str(tokens_root)).val_dataloader()))
    from_frames, from_tokens = dyn.rollout(batch), dyn.rollout(token_batch)  # greedy (temperature 0)
    assert "psnr_recon_B" in from_frames and "psnr_recon_B" not in from_tokens
    assert torch.equal(from_frames["ids_BThw"], from_tokens["ids_BThw"])
    C = dyn.loss_cfg.context_frames
    decoded = dyn.tokenizer.model.decode(token_batch["ids"][:, C : C + from_tokens["real_BTCHW"].shape[1]])
    assert torch.equal(from_tokens["real_BTCHW"], decoded.float())


def test_mismatched_data_is_a_clear_error_at_load(fitted, stage_ckpts, tiny_data_yaml):
    from whale_pl.lit.dynamics_module import DynamicsModule

    run, _ = fitted
    spec = dict(_dm(tiny_data_yaml).data_spec)
    load_frozen(run / "checkpoints" / "last.ckpt", DynamicsModule, data_spec=spec,
                data_spec_keys=["action_dim", "action_mean", "action_std"])  # the same data loads
    bad = dict(spec, action_std=[s * 2 for s in spec["action_std"]])
    with pytest.raises(HandoffError, match="action_std"):
        load_frozen(run / "checkpoints" / "last.ckpt", DynamicsModule, data_spec=bad,
                    data_spec_keys=["action_dim", "action_mean", "action_std"])
    tok, beh = stage_ckpts
    with pytest.raises(HandoffError, match="action_dim"):
        DynamicsModule(tokenizer_ckpt=str(tok), behavior_ckpt=str(beh), data_spec=dict(spec, action_dim=7))
    # a module built for other data refuses the datamodule when the fit starts
    module = DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=False, net=dict(dim=32, depth=1, heads=2))
    module.hparams["data_spec"] = dict(spec, action_mean=[0.5] * len(spec["action_mean"]))
    with pytest.raises(HandoffError, match="action_mean"):
        L.Trainer(max_steps=1, enable_checkpointing=False, **QUIET).fit(module, _dm(tiny_data_yaml))


def test_behavior_prior_on_another_clock_is_refused_at_fit(stage_ckpts, tiny_data_yaml):
    """Stage 3 refuses a behavior checkpoint trained on another frame stride, another action normalisation or
    without a retracing stride the fit draws, naming both values; the prior's own clock is accepted."""
    from whale_pl.lit.dynamics_module import DynamicsModule

    tok, beh = stage_ckpts
    module = DynamicsModule(tokenizer_ckpt=str(tok), behavior_ckpt=str(beh), net=dict(dim=32, depth=1, heads=2))
    fit = L.Trainer(max_steps=1, enable_checkpointing=False, limit_val_batches=0, **QUIET).fit
    with pytest.raises(HandoffError, match=r"another clock than this dynamics fit: frame_stride: behavior 2 != this "
                                           r"data's 1"):
        fit(module, _dm(tiny_data_yaml))
    with pytest.raises(HandoffError, match=r"retrace_strides: behavior trained on \[2, 3\], this fit asks its prior "
                                           r"about \[2, 4\]"):
        fit(module, _dm(tiny_data_yaml, **dict(CLOCK, retrace_strides=[2, 4], retrace_clip_len=2)))
    spec = _dm(tiny_data_yaml, **CLOCK).data_spec
    module.check_behavior_clock(spec)  # the prior's own clock
    doubled = [2 * s for s in spec["action_std"]]
    with pytest.raises(HandoffError, match=r"action_std: behavior \[.*\] != this data's \[.*\].*per-dataset"):
        module.check_behavior_clock(dict(spec, action_std=doubled,
                                         datasets=[dict(spec["datasets"][0], action_std=doubled)]))


def test_behavior_ablation_fits_without_behavior_checkpoint(stage_ckpts, tiny_data_yaml):
    from whale_pl.lit.dynamics_module import DynamicsModule

    tok, _ = stage_ckpts
    module = DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=False, net=dict(dim=32, depth=1, heads=2), optim=dict(warmup_steps=1), sampling=dict(rollout_horizon=2, rollout_batches=1))
    assert module.behavior is None and module.model.beh_proj is None
    L.Trainer(max_steps=2, enable_checkpointing=False, limit_val_batches=1, **QUIET).fit(module, _dm(tiny_data_yaml))
    with pytest.raises(ValueError, match="behavior_ckpt"):
        DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=True, behavior_ckpt=None)


def test_checkpoint_of_a_retired_option_is_refused_by_name(fitted, tmp_path):
    """Checkpoints that carry a retired option at the one value the code still implements load; one
    that set it otherwise (trained by a removed path) fails with an error naming the option."""
    from whale_pl.lit.dynamics_module import DynamicsModule

    run, _ = fitted
    raw = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    raw["hyper_parameters"].update(injection="adanorm", history="masked", full_mask_prob=0.0, change_input=False)
    torch.save(raw, tmp_path / "kept.ckpt")
    assert load_frozen(tmp_path / "kept.ckpt", DynamicsModule).model.uses_behavior
    raw["hyper_parameters"]["history"] = "clean"
    torch.save(raw, tmp_path / "clean.ckpt")
    with pytest.raises(HandoffError, match=r"history='clean', an option DynamicsModule no longer has.*cf14e40"):
        load_frozen(tmp_path / "clean.ckpt", DynamicsModule)


def test_checkpoint_of_the_previous_groups_loads_and_a_removed_switch_off_is_refused(fitted, tmp_path):
    """A checkpoint whose groups still hold the options removed since (at the values every config used) loads;
    one trained with such a switch off fails naming it."""
    from whale_pl.lit.dynamics_module import DynamicsModule

    run, _ = fitted
    raw = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = raw["hyper_parameters"]
    hp["net"] = {**hp["net"], "prev_frame_input": True, "copy_logit": True, "code_embed": True, "dropout": 0.0}
    hp["sampling"] = {**hp["sampling"], "eval_horizon": None, "log_samples": 4}
    hp["optim"] = {**hp["optim"], "betas": [0.9, 0.95], "total_steps": None}
    torch.save(raw, tmp_path / "previous.ckpt")
    assert load_frozen(tmp_path / "previous.ckpt", DynamicsModule).model.copy_gate is not None
    hp["net"]["copy_logit"] = False
    torch.save(raw, tmp_path / "no_copy.ckpt")
    with pytest.raises(HandoffError, match=r"copy_logit=False, an option DynamicsModule no longer has"):
        load_frozen(tmp_path / "no_copy.ckpt", DynamicsModule)


def test_z_at_imagination_is_the_prior_on_the_same_history(fitted, monkeypatch):
    """Open loop, closed loop and retracing condition each imagined step on z_t = the behavior prior over the
    history so far: the real context, then the frames imagined so far, with the evaluated policy's actions.
    Computed once over the finished rollout (the prior is causal), it gives the z each step was fed."""
    import numpy as np

    from whale_pl.rollout.value import WorldModel

    run, _ = fitted
    wm = WorldModel.load(run / "checkpoints" / "last.ckpt")
    assert wm.uses_behavior
    fed, predicted = [], []
    condition, predict_next = wm.model.condition, wm.model.predict_next

    def spy_condition(acts_BTA, zs_BTZ, stride_B):
        fed.append(zs_BTZ[:, -1].clone())  # the z leading into the frame being imagined
        return condition(acts_BTA, zs_BTZ, stride_B)

    def spy_predict(ids_BThw, acts_BTA, z_BTZ, stride_B):
        predicted.append((ids_BThw, acts_BTA, z_BTZ))
        return predict_next(ids_BThw, acts_BTA, z_BTZ, stride_B)

    monkeypatch.setattr(wm.model, "condition", spy_condition)
    monkeypatch.setattr(wm.model, "predict_next", spy_predict)
    rng = np.random.default_rng(0)
    B, C, H = 2, 2, 4
    ctx = wm.tokenize(rng.integers(0, 255, (B, C, 32, 32, 3), dtype=np.uint8))
    out = wm.imagine_open_loop(ctx, rng.uniform(-1, 1, (B, C + H - 1, 4)).astype(np.float32), horizon=H)
    closed = wm.imagine_closed_loop(ctx[:, :1], np.zeros((B, wm.model.state_head.out_features), np.float32),
                                    lambda t, s: rng.uniform(-1, 1, (B, 4)), horizon=H)
    for res, c in ((out, C), (closed, 1)):
        steps, fed[:] = list(fed[:H]), fed[H:]
        hist = torch.cat([ctx[:, :c], res["ids_BThw"]], 1)[:, : c + H - 1]
        prior_BTZ = wm.module.behavior_z(hist, res["actions_norm_BTA"][:, : c + H - 1])
        for i, z_BZ in enumerate(steps):
            torch.testing.assert_close(z_BZ, prior_BTZ[:, c - 1 + i], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(prior_BTZ[:, c - 1], prior_BTZ[:, -1], atol=1e-4)  # z moves with the history
    wm.step_uncertainty(ctx, out["ids_BThw"], out["actions_norm_BTA"], K=2)
    full = torch.cat([ctx, out["ids_BThw"]], 1)
    assert predicted and any(not torch.equal(ids[:, -1], ctx[:, -1]) for ids, _, _ in predicted)  # imagined anchors
    for ids, acts, z in predicted:
        assert any(torch.equal(ids[:, -1], full[:, j]) for j in range(full.shape[1]))
        torch.testing.assert_close(z, wm.module.behavior_z(ids, acts))


@pytest.mark.filterwarnings("ignore:Constant")
def test_experiment_probe_reads_z_of_real_rollouts_per_split(fitted, tiny_data_yaml):
    """The experiment's behavior probe runs the on-model's prior over real Meta-World rollouts from start
    states the data never held, and reports each split beside chance (a few steps of training: no figure
    is expected to beat chance here)."""
    from whale_pl import experiment
    from whale_pl.rollout.value import EvalSet, WorldModel, collect_real, frame_stride_of

    ckpt = fitted[0] / "checkpoints" / "last.ckpt"
    ev = EvalSet.from_data_config(tiny_data_yaml, starts=2, horizon=8, frame_stride=frame_stride_of(ckpt))
    real = collect_real(ev, progress=False)
    pr = experiment.behavior_probe(WorldModel.load(ckpt), real, ev)
    assert pr["families"] == ["expert", "lag", "noise"] and set(pr) == {"t_min", "families", "val", "ood_params"}
    assert pr["val"]["policy"]["episodes"] == len(ev.tasks) * 2 * len(ev.splits["val"])
    assert pr["val"]["family"]["chance"] == pytest.approx(1 / 3) and 0 <= pr["ood_params"]["family"]["acc"] <= 1
    md = "\n".join(experiment._probe_lines({"probe": pr}))
    assert "| val | family |" in md and "| ood_params | policy |" in md
