"""Episode <-> sample <-> shard round trips, action composition, and the verifying reader's errors."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from whale_pl.data.episode import (EEF7_ACTION_SPACE, METAWORLD_ACTION_SPACE, ActionSpace, Episode, EpisodeError)
from whale_pl.data.shards import ShardError, ShardWriter, iter_episodes, read_manifest, verify_dataset


def make_episode(i: int, t: int = 12, size: int = 16, split: str = "train", state: bool = True,
                 space: ActionSpace = METAWORLD_ACTION_SPACE) -> Episode:
    rng = np.random.default_rng(i)
    idx = np.arange(t)
    return Episode(
        frames=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
        actions=rng.normal(size=(t, space.dim)).astype(np.float32),
        rewards=rng.random(t).astype(np.float32), success=(idx > t // 2).astype(np.float32),
        is_first=idx == 0, is_last=idx == t - 1, is_terminal=idx == t - 1,
        state=rng.normal(size=(t, 5)).astype(np.float32) if state else None, language=f"do thing {i}",
        meta={"source": "synthetic", "task": "t", "policy": {"name": f"noise_0.{i % 3}", "family": "noise",
              "params": {"sigma": i % 3 / 10}}, "split": split, "action_space": space.to_json(),
              "control_hz": 10.0, "episode_id": f"syn/{i}"})


def same(a: Episode, b: Episode) -> bool:
    """Byte-exact equality of every array, the language and the metadata."""
    for n in ("frames", "state", "actions", "rewards", "success", "is_first", "is_last", "is_terminal"):
        x, y = getattr(a, n), getattr(b, n)
        if (x is None) != (y is None) or x is not None and (x.dtype, x.shape, x.tobytes()) != (y.dtype, y.shape,
                                                                                                y.tobytes()):
            return False
    return a.language == b.language and json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)


def test_sample_round_trip_byte_exact():
    for state in (True, False):
        ep = make_episode(3, state=state)
        back = Episode.from_sample(ep.to_sample("k0"))
        assert same(back, ep)
        assert back.frames.tobytes() == ep.frames.tobytes() and back.language == ep.language
    assert ep.to_sample("k0") == make_episode(3, state=False).to_sample("k0")  # deterministic bytes
    with pytest.raises(EpisodeError, match="no dots"):
        ep.to_sample("a.b")
    bad = make_episode(1)
    bad.actions = bad.actions.astype(np.float64)
    with pytest.raises(EpisodeError, match="field 'actions'"):
        bad.to_sample("k")


def test_shards_round_trip_and_manifest(tmp_path):
    eps = [make_episode(i, split=["train", "train", "val", "ood"][i % 4]) for i in range(11)]
    with ShardWriter(tmp_path / "a", episodes_per_shard=2) as w:
        for e in eps:
            w.write(e)
    m = verify_dataset(tmp_path / "a")
    assert m["episodes"] == 11 and m["frames"] == 11 * 12 and m["schema_version"] == 1
    assert all(len({m2["split"] for m2 in [s]}) == 1 for s in m["shards"])
    assert {k: v["episodes"] for k, v in m["splits"].items()} == {"train": 6, "val": 3, "ood": 2}
    back = list(iter_episodes(tmp_path / "a"))
    by_id = {e.meta["episode_id"]: e for e in eps}
    assert len(back) == 11 and all(same(b, by_id[b.meta["episode_id"]]) for b in back)
    a = np.concatenate([e.actions for e in eps if e.meta["split"] == "train"]).astype(np.float64)
    st = m["action_stats"]
    assert st["split"] == "train" and st["count"] == len(a)
    for k, v in {"mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0),
                 "q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0)}.items():
        np.testing.assert_allclose(st[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    # same episodes, same bytes
    with ShardWriter(tmp_path / "b", episodes_per_shard=2) as w:
        for e in eps:
            w.write(e)
    assert [s["sha256"] for s in verify_dataset(tmp_path / "b")["shards"]] == [s["sha256"] for s in m["shards"]]
    # readable by WebDataset itself
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "a" / m["shards"][0]["name"]), shardshuffle=False)]
    assert keys == m["shards"][0]["keys"]


def test_writer_replaces_and_is_atomic(tmp_path):
    with ShardWriter(tmp_path / "d") as w:
        w.write(make_episode(0))
        w.write(make_episode(1))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "e") as w:
            w.write(make_episode(0))
            raise RuntimeError("boom")
    assert not (tmp_path / "e" / "manifest.json").exists()
    assert not list((tmp_path / "e").glob(".*tmp*"))
    with pytest.raises(ShardError, match="incomplete|empty"):
        read_manifest(tmp_path / "e")
    with ShardWriter(tmp_path / "f") as w:
        w.write(make_episode(0, size=16))
        with pytest.raises(ShardError, match="frame_size"):
            w.write(make_episode(1, size=8))
    with ShardWriter(tmp_path / "d") as w:
        w.write(make_episode(5))
    assert verify_dataset(tmp_path / "d")["episodes"] == 1


def _member_offset(tar_path, name):
    with tarfile.open(tar_path) as tf:
        info = tf.getmember(name)
        return info.offset_data, info.size


@pytest.fixture
def small_ds(tmp_path):
    with ShardWriter(tmp_path / "ds", episodes_per_shard=3) as w:
        for i in range(6):
            w.write(make_episode(i))
    return tmp_path / "ds"


def test_corrupt_member_named(small_ds):
    shard = small_ds / "shard-000001.tar"
    off, size = _member_offset(shard, "ep0000004.frames.npz")
    with open(shard, "r+b") as fh:
        fh.seek(off + size // 2)
        fh.write(b"\xff" * 64)
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sha256"):
        verify_dataset(small_ds)
    with pytest.raises(ShardError, match=r"shard-000001\.tar key ep0000004: field 'frames'"):
        list(iter_episodes(small_ds, verify=False))


def test_checksum_and_listing_mismatch(small_ds):
    m = json.loads((small_ds / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "0" * 64
    (small_ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sha256 .* does not match"):
        verify_dataset(small_ds)
    (small_ds / "shard-000000.tar").rename(small_ds / "moved.tar")
    with pytest.raises(ShardError, match=r"shard-000000\.tar: shard listed in the manifest is missing"):
        verify_dataset(small_ds)


def test_wrong_frame_size_and_keys_named(small_ds):
    m = json.loads((small_ds / "manifest.json").read_text())
    m["frame_size"] = [32, 32]
    (small_ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-000000\.tar key ep0000000: field 'frames' has size \(16, 16\), "
                                         r"manifest says \(32, 32\)"):
        list(iter_episodes(small_ds))
    m["frame_size"] = [16, 16]
    m["shards"][1]["keys"][0] = "ep9999999"
    (small_ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-000001\.tar: keys differ from the manifest \(missing \['ep9999999'\]"):
        list(iter_episodes(small_ds))


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="is empty"):
        read_manifest(tmp_path / "empty")


def _rot(axis, a):
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _mat(rpy):  # extrinsic xyz: R = Rz(yaw) Ry(pitch) Rx(roll)
    return _rot("z", rpy[2]) @ _rot("y", rpy[1]) @ _rot("x", rpy[0])


def test_compose_sums_rotates_and_keeps_last_gripper():
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.5, 0.5, size=(4, 7))
    c = EEF7_ACTION_SPACE.compose(a)
    np.testing.assert_allclose(c[:3], a[:, :3].sum(0))
    assert c[6] == a[-1, 6]
    want = _mat(a[3, 3:6]) @ _mat(a[2, 3:6]) @ _mat(a[1, 3:6]) @ _mat(a[0, 3:6])
    np.testing.assert_allclose(_mat(c[3:6]), want, atol=1e-10)
    # rotations about one axis add up; small angles approximately add up
    np.testing.assert_allclose(EEF7_ACTION_SPACE.compose(np.array([[0, 0, 0, 0.2, 0, 0, 1], [0, 0, 0, 0.3, 0, 0, -1]]))[3:6],
                               [0.5, 0, 0], atol=1e-12)
    # batched, and K = 1 is the identity
    np.testing.assert_allclose(EEF7_ACTION_SPACE.compose(a[None, :1])[0], a[0], atol=1e-12)
    mw = METAWORLD_ACTION_SPACE.compose(rng.normal(size=(2, 3, 4)))
    assert mw.shape == (2, 4)


def test_uncomposable_space_raises():
    sp = ActionSpace(names=["dx", "joint7", "grip"], sum_dims=[0], gripper_index=2)
    with pytest.raises(EpisodeError, match=r"cannot compose dims \['joint7'\]"):
        sp.compose(np.zeros((2, 3)))
    assert ActionSpace.from_json(EEF7_ACTION_SPACE.to_json()) == EEF7_ACTION_SPACE


def test_truncated_and_garbled_tar_named(small_ds):
    shard = small_ds / "shard-000000.tar"
    data = shard.read_bytes()
    off, size = _member_offset(shard, "ep0000001.frames.npz")
    shard.write_bytes(data[: off + size // 2])
    with pytest.raises(ShardError, match=r"shard-000000\.tar key ep0000001: member 'ep0000001.frames.npz' truncated"):
        list(iter_episodes(small_ds, verify=False))
    garbled = bytearray(data)
    garbled[off - 512 + 130] ^= 0x55  # inside the size field of ep0000001.frames.npz's header
    shard.write_bytes(bytes(garbled))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: corrupt tar header at byte \d+ \(after key ep0000000\): bad checksum"):
        list(iter_episodes(small_ds, verify=False))
