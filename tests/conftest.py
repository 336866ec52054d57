"""Shared fixtures: a tiny real Meta-World dataset collected once per test session.

- ``tiny_config``  the ``CollectConfig`` of the tiny dataset (2 tasks, 3 training policies of
                   families expert/noise/lag, 1 OOD policy noise_1.0; 24 steps, 32x32)
- ``tiny_shards``  Path of its verified dataset directory (train: 12, val: 6, ood: 4 episodes;
                   2 episodes a shard, so 11 shards)
- ``tiny_data_yaml`` Path of a dataset YAML naming that directory, for
                   ``MetaWorldDataModule(config=...)`` (finds the shards complete, collects nothing)
- ``tiny_dynamics`` two tiny dynamics checkpoints (seeds 0, 1) on one tiny tokenizer

Rendering happens in spawned worker processes, so the pytest process itself never renders (a
forked DataLoader worker of a process that has rendered hangs; README, Troubleshooting).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

TINY = dict(
    name="tiny",
    tasks=["push-v3", "door-open-v3"],
    train_policies=["expert", "noise_0.5", "lag_3"],
    ood_policies=["noise_1.0"],
    episodes_per_policy=2,
    val_episodes_per_policy=1,
    ood_episodes_per_policy=2,
    max_steps=24,
    size=32,
    camera="corner2",
    seed=0,
    episodes_per_shard=2,
    workers=2,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Test shapes are tiny: one intra-op thread is faster than two, and far faster on a busy machine.
    Tests that need more threads set them themselves; the count is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    from whale_pl.data.metaworld import CollectConfig

    return CollectConfig(out=str(tmp_path_factory.mktemp("tiny_metaworld") / "tiny"), **TINY)


@pytest.fixture(scope="session")
def tiny_shards(tiny_config) -> Path:
    from whale_pl.data.metaworld import ensure_collected

    ensure_collected(tiny_config, progress=False)
    return Path(tiny_config.out)


@pytest.fixture(scope="session")
def tiny_data_yaml(tiny_shards, tiny_config, tmp_path_factory) -> Path:
    import yaml

    p = tmp_path_factory.mktemp("tiny_yaml") / "data.yaml"
    d = dict(TINY, out=str(tiny_shards))
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="session")
def tiny_world(tiny_data_yaml, tmp_path_factory):
    """``make(name, frame_stride=1, tok_steps=3, dyn_steps=4) -> Path``: a tiny tokenizer and a tiny
    dynamics model on it (behavior off, retracing strides 2-3), a few real steps each; the dynamics
    checkpoint's path."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    def fit(module, out: Path, steps: int, stride: int) -> Path:
        dm = MetaWorldDataModule(config=str(tiny_data_yaml), clip_len=4, frame_stride=stride, batch_size=4,
                                 num_workers=0, steps_per_epoch=steps, val_steps=1, retrace_strides=[2, 3],
                                 retrace_prob=0.5)
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                  callbacks=[ModelCheckpoint(dirpath=out, filename="best")]).fit(module, dm)
        return out / "best.ckpt"

    def make(name: str, frame_stride: int = 1, tok_steps: int = 3, dyn_steps: int = 4) -> Path:
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        tok = fit(TokenizerModule(net=dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2, codebook_size=32, code_dim=8), optim=dict(warmup_steps=1)), out / "tok", tok_steps, 1)
        torch.manual_seed(0)
        dyn = DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=False, net=dict(dim=32, depth=1, heads=2, max_frames=8, max_stride=3), optim=dict(warmup_steps=1), sampling=dict(rollout_horizon=2, rollout_batches=1))
        return fit(dyn, out / "dyn", dyn_steps, frame_stride)

    return make


@pytest.fixture(scope="session")
def tiny_dynamics(tiny_data_yaml, tmp_path_factory) -> list[Path]:
    """A tiny tokenizer and two tiny dynamics models on it (seeds 0, 1; behavior off; retracing clips)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    out = tmp_path_factory.mktemp("value_ckpts")

    def dm():
        return MetaWorldDataModule(config=str(tiny_data_yaml), clip_len=4, batch_size=4, num_workers=0,
                                   steps_per_epoch=6, val_steps=1, retrace_strides=[2, 3], retrace_prob=0.5)

    def fit(module, name, steps):
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=[ModelCheckpoint(dirpath=out / name, filename="best")]).fit(module, dm())
        return out / name / "best.ckpt"

    torch.manual_seed(0)
    tok = fit(TokenizerModule(net=dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2, codebook_size=32, code_dim=8), optim=dict(warmup_steps=1)), "tok", 3)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        dyn = DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=False, net=dict(dim=32, depth=1, heads=2, max_frames=8, max_stride=3), optim=dict(warmup_steps=1), sampling=dict(rollout_horizon=2, rollout_batches=1))
        ckpts.append(fit(dyn, f"dyn{seed}", 6))
    return ckpts
