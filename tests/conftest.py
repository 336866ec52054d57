"""Shared fixtures: a tiny real Meta-World dataset collected once per test session.

- ``tiny_config``  the ``CollectConfig`` of the tiny dataset (2 tasks, 3 training policies of
                   families expert/noise/lag, 1 OOD policy noise_1.0; 24 steps, 32x32)
- ``tiny_shards``  Path of its verified dataset directory (train: 12, val: 6, ood: 4 episodes;
                   2 episodes a shard, so 11 shards)
- ``tiny_data_yaml`` Path of a dataset YAML naming that directory, for
                   ``MetaWorldDataModule(config=...)`` (finds the shards complete, collects nothing)

Rendering happens in spawned worker processes, so the pytest process itself never renders (a
forked DataLoader worker of a process that has rendered hangs; see PLATFORM.md).
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
