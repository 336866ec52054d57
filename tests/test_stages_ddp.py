"""Two-process CPU DDP (gloo) fits of the behavior and dynamics stages through `whale fit` with their
demo YAMLs (real tiny shards, real earlier-stage checkpoints, real Lightning):

- the fit runs its steps on both ranks, and the ranks read different episodes;
- the trained weights are identical on both ranks afterwards, and ``last.ckpt`` holds them;
- the frozen earlier stages stay bit-identical (and their files untouched);
- one checkpoint set (``best.ckpt``, ``last.ckpt``) and one TensorBoard event file, written by rank 0
  only (Lightning's own checkpoint writer, noting which rank called it);
- every logged validation metric is reduced across ranks: both ranks see the same value, and it is
  what a single process computes from ``last.ckpt`` over the union of the two ranks' validation
  batches (not what it computes over rank 0's batches alone).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from whale_pl.lit.handoff import load_frozen

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2,
                      codebook_size=32, code_dim=8)
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0)

SCRIPT = textwrap.dedent('''
    """`whale fit` (LightningCLI over the stage YAML; built with run=False, so no subcommand in the
    arguments, then fitted here) with a probe callback and a checkpoint writer
    that notes which rank wrote which file."""
    import sys
    import lightning as L
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from whale_pl.cli import lightning_cli

    out_dir, argv = sys.argv[1], sys.argv[2:]


    class RecordingIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            super().save_checkpoint(checkpoint, path, storage_options)
            assert torch.distributed.is_initialized()
            with open(f"{out_dir}/writes_rank{torch.distributed.get_rank()}.txt", "a") as f:
                f.write(f"{path}\\n")


    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


    class Probe(L.Callback):
        def __init__(self):
            self.train_keys, self.val_batches, self.val_metrics, self.init = [], [], [], None

        def on_train_start(self, trainer, pl_module):
            self.init = snapshot(pl_module.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train_keys += list(zip(batch["episode"].tolist(), batch["start"].tolist()))

        def on_validation_epoch_start(self, trainer, pl_module):
            self.val_batches = []

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val_batches.append({k: v.clone() for k, v in batch.items()})

        def on_validation_end(self, trainer, pl_module):
            self.val_metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                     if k.startswith("val")})

        def on_train_end(self, trainer, pl_module):
            frozen = {n: snapshot(getattr(pl_module, n)) for n in ("tokenizer", "behavior")
                      if getattr(pl_module, n, None) is not None}
            torch.save({"world_size": trainer.world_size, "global_step": trainer.global_step,
                        "init": self.init, "model": snapshot(pl_module.model), "frozen": frozen,
                        "train_keys": self.train_keys, "val_batches": self.val_batches,
                        "val_metrics": self.val_metrics},
                       f"{out_dir}/rank{trainer.global_rank}.pt")


    cli = lightning_cli(argv, run=False)
    cli.trainer.strategy.checkpoint_io = RecordingIO()
    cli.trainer.callbacks.append(Probe())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
''')


def _dm(data_yaml: Path, clip_len: int = 4, **kw):
    from whale_pl.data.datamodule import MetaWorldDataModule

    return MetaWorldDataModule(config=str(data_yaml), clip_len=clip_len, batch_size=2, num_workers=0,
                               steps_per_epoch=3, val_steps=1, **kw)


CLOCK = dict(frame_stride=2, retrace_strides=[2, 3], retrace_prob=0.2, retrace_clip_len=3)  # 24-frame tiny episodes
CLOCK_FLAGS = ["--data.init_args.frame_stride", "2", "--data.init_args.retrace_clip_len", "3"]  # with the YAML's strides


@pytest.fixture(scope="module")
def stage_ckpts(tiny_data_yaml, tmp_path_factory) -> tuple[Path, Path]:
    """Real stage-1 and stage-2 checkpoints, each fitted for a few steps (single process; stage 2 on the clock
    of the stage-3 fit below)."""
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


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ddp_fit(stage: str, tmp_path: Path, overrides: list[str]) -> tuple[Path, dict, dict]:
    """`whale fit --config stages/demo/<stage>.yaml` on 2 CPU processes (gloo); returns the run
    directory and each rank's probe record."""
    script, out, runs = tmp_path / "ddp_fit.py", tmp_path / "out", tmp_path / "runs"
    script.write_text(SCRIPT)
    out.mkdir()
    argv = ["--config", str(REPO / "stages" / "demo" / f"{stage}.yaml"),
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "32-true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(runs), *overrides]
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), str(out), *argv], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]
    run = runs / stage
    # (d) one checkpoint set and one event file, written by rank 0 only
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not (out / "writes_rank1.txt").exists(), "rank 1 wrote checkpoints"
    writes = (out / "writes_rank0.txt").read_text().split()
    assert {Path(w).name for w in writes} == {"best.ckpt", "last.ckpt"} and len(writes) >= 2
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    return run, ranks[0], ranks[1]


def _check_ranks(s0: dict, s1: dict, run: Path, steps: int, frozen_before: dict) -> dict:
    """(a) the steps ran on both ranks on different episodes; (b) identical trained weights, held by
    last.ckpt; (c) frozen stages bit-identical to their files. Returns last.ckpt."""
    for s in (s0, s1):
        assert s["world_size"] == 2 and s["global_step"] == steps
    assert len(s0["train_keys"]) == len(s1["train_keys"]) > 0
    assert not {e for e, _ in s0["train_keys"]} & {e for e, _ in s1["train_keys"]}, "ranks read the same episodes"
    assert s0["model"].keys() == s1["model"].keys()
    for k in s0["model"]:
        assert torch.equal(s0["model"][k], s1["model"][k]), f"model.{k} differs between ranks"
    assert any(not torch.equal(s0["model"][k], s0["init"][k]) for k in s0["model"]), "the fit changed nothing"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps
    for k, v in s0["model"].items():
        assert torch.equal(last["state_dict"][f"model.{k}"], v), f"last.ckpt model.{k} is not the trained weight"
    for s in (s0, s1):
        assert s["frozen"].keys() == frozen_before.keys()
        for name, before in frozen_before.items():
            assert s["frozen"][name].keys() == before.keys()
            for k in before:
                assert torch.equal(s["frozen"][name][k], before[k]), f"frozen {name}.{k} changed in the fit"
    return last


def _validate(module: L.LightningModule, batches: list[dict]) -> dict[str, float]:
    """One single-process validation pass over given batches; the epoch-level metrics."""
    trainer = L.Trainer(devices=1, enable_checkpointing=False, **QUIET)
    trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}


def _check_metrics_reduced(s0: dict, s1: dict, make_module, loss_key: str) -> dict[str, float]:
    """(e) both ranks saw the same validation metrics, and they are the single-process values over
    the union of the ranks' (different) validation batches, not over rank 0's alone."""
    m0, m1 = s0["val_metrics"][-1], s1["val_metrics"][-1]
    assert m0 == m1, f"ranks logged different validation metrics: {m0} vs {m1}"
    keys0 = {(e, st) for b in s0["val_batches"] for e, st in zip(b["episode"].tolist(), b["start"].tolist())}
    keys1 = {(e, st) for b in s1["val_batches"] for e, st in zip(b["episode"].tolist(), b["start"].tolist())}
    assert keys0 and keys1 and not keys0 & keys1, "the ranks validated on the same clips"
    union = _validate(make_module(), s0["val_batches"] + s1["val_batches"])
    assert union.keys() == m0.keys()
    for k in m0:
        assert m0[k] == pytest.approx(union[k], rel=1e-5, abs=1e-6), f"{k}: DDP {m0[k]} != union {union[k]}"
    local = _validate(make_module(), s0["val_batches"])
    assert local[loss_key] != pytest.approx(m0[loss_key], rel=1e-4), "rank 0's data alone gives the same value"
    return m0


@pytest.mark.ddp
def test_behavior_two_process_ddp_fit(stage_ckpts, tiny_data_yaml, tokens_root, tmp_path):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok, _ = stage_ckpts
    tok_sha = _sha(tok)
    before = {"tokenizer": load_frozen(tok, TokenizerModule).state_dict()}
    run, s0, s1 = _ddp_fit("behavior", tmp_path, [
        "--model.init_args.tokenizer_ckpt", str(tok), "--model.init_args.expect_codebook_size", "32",
        "--model.init_args.net.dim", "16", "--model.init_args.net.depth", "1", "--model.init_args.net.heads", "2",
        "--model.init_args.net.z_dim", "4", "--model.init_args.net.decoder_hidden", "16",
        "--model.init_args.optim.warmup_steps", "1", "--model.init_args.probe_t_min", "2",
        "--data.init_args.config", str(tiny_data_yaml), "--data.init_args.tokens", str(tokens_root),
        "--data.init_args.clip_len", "6", *CLOCK_FLAGS,
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.steps_per_epoch", "2", "--data.init_args.val_steps", "2", "--trainer.max_steps", "4",
    ])
    last = _check_ranks(s0, s1, run, 4, before)
    assert _sha(tok) == tok_sha
    assert not any(k.startswith("tokenizer.") for k in last["state_dict"])
    assert all("ids" in b and "frames" not in b for b in s0["val_batches"] + s1["val_batches"])  # token shards

    def module():
        return BehaviorModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")

    metrics = _check_metrics_reduced(s0, s1, module, "val/loss")
    assert {"val/loss", "val/kl", "val/action_mse", "val/probe_acc_clips"} <= metrics.keys()


@pytest.mark.ddp
def test_dynamics_two_process_ddp_fit(stage_ckpts, tiny_data_yaml, tokens_root, tmp_path):
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok, beh = stage_ckpts
    shas = (_sha(tok), _sha(beh))
    before = {"tokenizer": load_frozen(tok, TokenizerModule).state_dict(),
              "behavior": load_frozen(beh, BehaviorModule).state_dict()}
    run, s0, s1 = _ddp_fit("dynamics", tmp_path, [
        "--model.init_args.tokenizer_ckpt", str(tok), "--model.init_args.behavior_ckpt", str(beh),
        "--model.init_args.net.dim", "32", "--model.init_args.net.depth", "1", "--model.init_args.net.heads", "2",
        "--model.init_args.sampling.maskgit_steps", "2", "--model.init_args.sampling.rollout_horizon", "4",
        "--model.init_args.sampling.rollout_batches", "4", "--model.init_args.optim.warmup_steps", "1",
        "--data.init_args.config", str(tiny_data_yaml), "--data.init_args.tokens", str(tokens_root),
        "--data.init_args.clip_len", "6", "--data.init_args.val_clip_len", "6", *CLOCK_FLAGS,
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.steps_per_epoch", "2", "--data.init_args.val_steps", "2", "--trainer.max_steps", "4",
    ])
    last = _check_ranks(s0, s1, run, 4, before)
    assert (_sha(tok), _sha(beh)) == shas
    assert not any(k.startswith(("tokenizer.", "behavior.")) for k in last["state_dict"])

    def module():
        return DynamicsModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")

    metrics = _check_metrics_reduced(s0, s1, module, "val/ce")
    assert {"val/ce", "val/acc", "val/psnr_ar_all", "val/ssim_ar_all"} <= metrics.keys()
