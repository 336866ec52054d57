"""ClipDataModule / MetaWorldDataModule: batch layout, clip contents, normalisation, splitting, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from whale_pl.data.datamodule import ClipDataModule, MetaWorldDataModule
from whale_pl.data.episode import METAWORLD_ACTION_SPACE
from whale_pl.data.shards import ShardError, ShardWriter, iter_episodes, verify_dataset


def _episodes_by_index(path):
    m = verify_dataset(path)
    eps = list(iter_episodes(path))
    return m, eps  # manifest order == batch["episode"] index


def test_batch_layout_contents_and_normalisation(tiny_shards):
    dm = ClipDataModule(str(tiny_shards), clip_len=6, batch_size=5, num_workers=0, steps_per_epoch=4,
                        retrace_strides=[2, 3], retrace_prob=0.5, seed=1)
    dm.setup("fit")
    m, eps = _episodes_by_index(tiny_shards)
    mean, std = np.array(m["action_stats"]["mean"]), np.array(m["action_stats"]["std"])
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 == len(dm.train_dataloader())
    b = batches[0]
    B, T = 5, 6
    expect = {"frames": (torch.uint8, (B, T, 3, 32, 32)), "actions": (torch.float32, (B, T, 4)),
              "actions_raw": (torch.float32, (B, T, 4)), "rewards": (torch.float32, (B, T)),
              "success": (torch.float32, (B, T)), "state": (torch.float32, (B, T, 39)), "is_first": (torch.bool, (B, T)),
              "family": (torch.int64, (B,)), "policy": (torch.int64, (B,)), "ood": (torch.bool, (B,)),
              "stride": (torch.int64, (B,))}
    for k, (dt, shape) in expect.items():
        assert b[k].dtype == dt and tuple(b[k].shape) == shape, (k, b[k].dtype, b[k].shape)
    strides = torch.cat([x["stride"] for x in batches])
    assert set(strides.tolist()) <= {1, 2, 3} and (strides > 1).any() and (strides == 1).any()
    for x in batches:
        for i in range(B):
            ep = eps[int(x["episode"][i])]
            assert ep.meta["split"] == "train"
            k, s = int(x["stride"][i]), int(x["start"][i])
            idx = s + k * np.arange(T)
            assert torch.equal(x["frames"][i], torch.from_numpy(ep.frames[idx]).permute(0, 3, 1, 2))
            win = idx[:, None] + np.arange(k)
            raw = METAWORLD_ACTION_SPACE.compose(ep.actions[win])
            np.testing.assert_allclose(x["actions_raw"][i].numpy(), raw, atol=1e-6)
            norm = (raw[:, :3] - k * mean[:3]) / std[:3]
            np.testing.assert_allclose(x["actions"][i, :, :3].numpy(), norm, atol=1e-5)
            np.testing.assert_array_equal(x["actions"][i, :, 3].numpy(), raw[:, 3])  # gripper raw
            np.testing.assert_allclose(x["rewards"][i].numpy(), ep.rewards[win].sum(1), atol=1e-5)
            np.testing.assert_array_equal(x["state"][i].numpy(), ep.state[idx])
            assert dm.data_spec["policies"][int(x["policy"][i])] == ep.meta["policy"]["name"]
            assert dm.data_spec["families"][int(x["family"][i])] == ep.meta["policy"]["family"]
            assert not bool(x["ood"][i])
    spec = dm.data_spec
    assert spec["frame_size"] == [32, 32] and spec["action_dim"] == 4 and spec["state_dim"] == 39
    assert spec["families"] == ["expert", "lag", "noise"] and spec["ood_policies"] == ["noise_1.0"]
    np.testing.assert_allclose(spec["action_mean"][:3], mean[:3], rtol=1e-6)
    json.dumps(spec)


def test_epochs_reshuffle_and_validation_is_fixed(tiny_shards):
    dm = ClipDataModule(str(tiny_shards), clip_len=4, batch_size=4, num_workers=0, steps_per_epoch=3, val_steps=2)
    dm.setup("fit")
    ids = lambda loader: [(b["episode"].tolist(), b["start"].tolist()) for b in loader]  # noqa: E731
    tl = dm.train_dataloader()
    e0, e1 = ids(tl), ids(tl)
    assert e0 != e1
    v0, v1 = ids(dm.val_dataloader()), ids(dm.val_dataloader())
    assert v0 == v1
    _, eps = _episodes_by_index(tiny_shards)
    assert all(eps[e].meta["split"] == "val" for b in v0 for e in b[0])
    dm2 = ClipDataModule(str(tiny_shards), clip_len=4, batch_size=4, num_workers=0, steps_per_epoch=3, val_splits=["ood"])
    dm2.setup("fit")
    assert all(bool(b["ood"].all()) for b in dm2.val_dataloader())
    # longer held-out clips (e.g. for FVD) beside short training clips, cut from the same frames
    dm3 = ClipDataModule(str(tiny_shards), clip_len=4, val_clip_len=10, batch_size=4, num_workers=0, steps_per_epoch=3,
                         val_steps=2)
    dm3.setup("fit")
    vb, tb = next(iter(dm3.val_dataloader())), next(iter(dm3.train_dataloader()))
    assert vb["frames"].shape[1] == 10 and tb["frames"].shape[1] == 4
    e, s0 = vb["episode"][0].item(), vb["start"][0].item()
    assert torch.equal(vb["frames"][0].permute(0, 2, 3, 1), torch.from_numpy(eps[e].frames[s0 : s0 + 10]))
    with pytest.raises(ValueError, match="val_clip_len"):
        ClipDataModule(str(tiny_shards), clip_len=4, val_clip_len=0)


def test_readers_get_disjoint_episodes(tiny_shards):
    """val: 3 shards for 4 readers -> split by episode; train: 6 shards for 2 readers -> by shard."""
    for split, world in (("val", 4), ("train", 2)):
        seen = []
        for rank in range(world):
            dm = ClipDataModule(str(tiny_shards), clip_len=4, batch_size=8, num_workers=0, steps_per_epoch=6,
                                val_steps=6, rank=rank, world_size=world)
            dm.setup("fit")
            loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
            seen.append({e for b in loader for e in b["episode"].tolist()})
        for i in range(world):
            for j in range(i + 1, world):
                assert not seen[i] & seen[j], (split, seen)
        m = verify_dataset(tiny_shards)
        assert len(set().union(*seen)) == m["splits"][split]["episodes"]
    dm = ClipDataModule(str(tiny_shards), clip_len=4, num_workers=0, val_splits=["ood"], rank=5, world_size=6)
    dm.setup("fit")
    with pytest.raises(ShardError, match="fewer than the 6 readers"):
        next(iter(dm.val_dataloader()))


def _synthetic_dir(path, shift: float, n: int = 4):
    rng = np.random.default_rng(int(shift * 10))
    t = 10
    idx = np.arange(t)
    from whale_pl.data.episode import Episode

    with ShardWriter(path, episodes_per_shard=1) as w:
        for i in range(n):
            w.write(Episode(frames=rng.integers(0, 256, (t, 32, 32, 3), dtype=np.uint8),
                            actions=(rng.normal(size=(t, 4)) * 0.1 + shift).astype(np.float32),
                            rewards=np.zeros(t, np.float32), success=np.zeros(t, np.float32), is_first=idx == 0,
                            is_last=idx == t - 1, is_terminal=idx == t - 1, state=None,
                            meta={"action_space": METAWORLD_ACTION_SPACE.to_json(), "task": "syn",
                                  "split": "train", "episode_id": f"s{i}"}))
    return path


def test_weighted_dirs_each_normalised_with_own_stats(tiny_shards, tmp_path):
    other = _synthetic_dir(tmp_path / "other", shift=3.0)
    dm = ClipDataModule([str(tiny_shards), str(other)], weights=[1, 3], clip_len=4, batch_size=16, num_workers=0,
                        steps_per_epoch=10)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    ds = torch.cat([b["dataset"] for b in batches])
    assert 0.62 < (ds == 1).float().mean() < 0.88
    a = torch.cat([b["actions"][:, :, :3] for b in batches])
    raw = torch.cat([b["actions_raw"][:, :, :3] for b in batches])
    # raw actions of the shifted dir are ~3; normalised with its own stats both dirs are ~N(0, 1)
    assert raw[ds == 1].mean() > 2.5 and a[ds == 1].mean().abs() < 0.5 and a[ds == 0].abs().mean() < 2
    assert dm.data_spec["state_dim"] == 0 and batches[0]["state"].shape[-1] == 0  # dirs disagree on state: none served
    assert len(dm.data_spec["datasets"]) == 2


def test_metaworld_datamodule_reuses_shards_and_serves_episodes(tiny_data_yaml, tiny_shards):
    before = (tiny_shards / "manifest.json").stat().st_mtime_ns
    dm = MetaWorldDataModule(str(tiny_data_yaml), clip_len=8, batch_size=2, num_workers=0, steps_per_epoch=1)
    dm.prepare_data()
    assert (tiny_shards / "manifest.json").stat().st_mtime_ns == before
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["frames"].shape == (2, 8, 3, 32, 32)
    assert dm.data_spec["metaworld"]["ood_policies"] == ["noise_1.0"] and dm.data_spec["metaworld"]["camera"] == "corner2"
    ood = dm.episodes("ood")
    assert len(ood) == 4 and {e.meta["policy"]["name"] for e in ood} == {"noise_1.0"}
    assert [e.meta["episode_id"] for e in dm.iter_episodes("val")] == [e.meta["episode_id"] for e in
                                                                       iter_episodes(tiny_shards, ["val"])]


def test_missing_data_errors(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        ClipDataModule(str(tmp_path / "nothing"), num_workers=0).setup("fit")
    d = _synthetic_dir(tmp_path / "short", shift=0.0)
    dm = ClipDataModule(str(d), clip_len=16, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ShardError, match="has the 16 frames a clip needs"):
        next(iter(dm.train_dataloader()))
    with pytest.raises(ShardError, match=r"no shards of split\(s\) \['val'\]"):
        dm.val_dataloader()


DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, lightning as L
    from whale_pl.data.datamodule import ClipDataModule

    data_dir, out_dir = sys.argv[1], sys.argv[2]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.seen, self.steps = [], 0

        def training_step(self, batch, i):
            self.seen += batch["episode"].tolist()
            self.steps += 1
            return self.lin(batch["actions"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_end(self):
            with open(f"{out_dir}/rank{self.global_rank}.json", "w") as fh:
                json.dump({"rank": self.global_rank, "world": self.trainer.world_size, "steps": self.steps,
                           "episodes": sorted(set(self.seen))}, fh)

    dm = ClipDataModule(data_dir, clip_len=4, batch_size=2, num_workers=1, steps_per_epoch=3, val_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(Probe(), datamodule=dm)
''')


@pytest.mark.ddp
def test_two_process_ddp_fit(tiny_shards, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), str(tiny_shards), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in res] == [2, 2]
    assert res[0]["steps"] == res[1]["steps"] == 6  # 2 epochs x 3 steps on every rank
    assert not set(res[0]["episodes"]) & set(res[1]["episodes"]) and res[0]["episodes"] and res[1]["episodes"]


def test_frame_stride_is_the_clock_and_retrace_strides_multiply_it(tiny_shards):
    """frame_stride 2: base clips step 2 frames (batch stride 1), retracing clips 2*m (batch stride m);
    actions are composed and rewards summed over the underlying steps; data_spec records the clock."""
    dm = ClipDataModule(str(tiny_shards), clip_len=4, frame_stride=2, batch_size=4, num_workers=0,
                        steps_per_epoch=6, retrace_strides=[2, 3], retrace_prob=0.6, seed=3)
    dm.setup("fit")
    assert dm.data_spec["frame_stride"] == 2
    m, eps = _episodes_by_index(tiny_shards)
    mean, std = np.array(m["action_stats"]["mean"]), np.array(m["action_stats"]["std"])
    seen = set()
    for x in dm.train_dataloader():
        for i in range(4):
            ep = eps[int(x["episode"][i])]
            mult, s = int(x["stride"][i]), int(x["start"][i])
            seen.add(mult)
            k = 2 * mult
            idx = s + k * np.arange(4)
            assert torch.equal(x["frames"][i], torch.from_numpy(ep.frames[idx]).permute(0, 3, 1, 2))
            win = idx[:, None] + np.arange(k)
            raw = METAWORLD_ACTION_SPACE.compose(ep.actions[win])
            np.testing.assert_allclose(x["actions"][i, :, :3].numpy(), (raw[:, :3] - k * mean[:3]) / std[:3], atol=1e-5)
            np.testing.assert_allclose(x["rewards"][i].numpy(), ep.rewards[win].sum(1), atol=1e-5)
    assert seen == {1, 2, 3}


def test_retracing_batches_use_their_own_clip_length(tiny_shards):
    """retrace_clip_len 3 with frame_stride 2: base batches are 8 frames (16 steps of the 24-frame
    episodes), retracing batches 3 frames at strides 2 and 3 (12 and 18 steps), which would not fit
    at 8 frames; every batch has one stride and one length."""
    dm = ClipDataModule(str(tiny_shards), clip_len=8, frame_stride=2, batch_size=3, num_workers=0,
                        steps_per_epoch=12, retrace_strides=[2, 3], retrace_prob=0.5, retrace_clip_len=3, seed=4)
    dm.setup("fit")
    _, eps = _episodes_by_index(tiny_shards)
    shapes = set()
    for x in dm.train_dataloader():
        mult = set(x["stride"].tolist())
        assert len(mult) == 1
        (mult,) = mult
        T = x["frames"].shape[1]
        shapes.add((mult, T))
        for i in range(3):
            ep = eps[int(x["episode"][i])]
            idx = int(x["start"][i]) + 2 * mult * np.arange(T)
            assert torch.equal(x["frames"][i], torch.from_numpy(ep.frames[idx]).permute(0, 3, 1, 2))
    assert shapes == {(1, 8), (2, 3), (3, 3)}
    assert {b["frames"].shape[1] for b in dm.val_dataloader()} == {8}
    with pytest.raises(ValueError, match="retrace_clip_len"):
        ClipDataModule(str(tiny_shards), clip_len=4, retrace_clip_len=5)
