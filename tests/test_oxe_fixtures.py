"""Other RLDS schemas (RT-1 nested actions, several cameras, no language), bad input, resumability.

Every fixture is a real RLDS directory: features.json, dataset_info.json and TFRecord files written
with our framing and CRCs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from whale_pl.data.episode import EEF7_ACTION_SPACE
from whale_pl.data.oxe.cli import main
from whale_pl.data.oxe.convert import PARTS, ConversionError, ConvertOptions, convert_dataset, source_files
from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.registry import REGISTRY, ActionMap
from whale_pl.data.oxe.schema import load_schema
from whale_pl.data.oxe.standardize import RecordError, Where, relative_gripper_to_absolute, standard_actions
from whale_pl.data.oxe.tfrecord import iter_records
from whale_pl.data.shards import iter_episodes, sha256_file, verify_dataset

import rlds_fixtures as rw  # noqa: E402  (tests/ is on sys.path under pytest)
from rlds_fixtures import build_example, write_records  # noqa: E402

T = 6
H, W = 24, 32


def _frames(rng, t=T, h=H, w=W):
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _flags(t=T):
    return {"steps/is_first": np.arange(t) == 0, "steps/is_last": np.arange(t) == t - 1,
            "steps/is_terminal": np.arange(t) == t - 1, "steps/reward": (np.arange(t) == t - 1).astype(np.float32)}


def _flag_schema():
    return {"is_first": rw.scalar("bool"), "is_last": rw.scalar("bool"), "is_terminal": rw.scalar("bool"),
            "reward": rw.scalar("float32")}


def rt1_dataset(root: Path, n_files=2, per_file=2, drop_key_at: int | None = None, seed=0) -> tuple[Path, list]:
    """RT-1 layout (registered as fractal20220817_data): nested action dict, two cameras,
    the instruction under observation/."""
    rng = np.random.default_rng(seed)
    feats = rw.features_json({
        "action": {"world_vector": rw.tensor((3,)), "rotation_delta": rw.tensor((3,)),
                   "gripper_closedness_action": rw.tensor((1,)),
                   "base_displacement_vector": rw.tensor((2,)),
                   "terminate_episode": rw.tensor((3,), "int32")},
        "observation": {"image": rw.image(H, W), "wrist_image": rw.image(16, 16),
                        # a string Tensor, as in the real RT-1 style features.json
                        "natural_language_instruction": rw.tensor((), "string")},
        **_flag_schema()})
    files, raw = [], []
    k = 0
    for _ in range(n_files):
        recs = []
        for _ in range(per_file):
            fr = _frames(rng)
            vals = {
                "steps/action/world_vector": rng.normal(size=(T, 3)).astype(np.float32),
                "steps/action/rotation_delta": rng.normal(size=(T, 3)).astype(np.float32) * 0.1,
                "steps/action/gripper_closedness_action": np.array([0, 1, 0, 0, -1, 0], np.float32)[:, None],
                "steps/action/base_displacement_vector": np.zeros((T, 2), np.float32),
                "steps/action/terminate_episode": np.tile([0, 1, 0], (T, 1)).astype(np.int32),
                "steps/observation/image": [rw.encode_image(f) for f in fr],
                "steps/observation/wrist_image": [rw.encode_image(f[:16, :16]) for f in fr],
                "steps/observation/natural_language_instruction": [f"pick block {k}".encode()] * T,
                **_flags()}
            if drop_key_at == k:
                del vals["steps/action/rotation_delta"]
            raw.append(vals)
            recs.append(rw.episode_record(vals))
            k += 1
        files.append(recs)
    d = rw.write_dataset(root / "fractal20220817_data" / "0.1.0", feats, {"train": files})
    return d, raw


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def _center_resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR,
                                                  box=(left, top, left + m, top + m)))


# ------------------------------------------------------------------------------------------------
def test_rt1_nested_actions_two_cameras_language(tmp_path):
    src, raw = rt1_dataset(tmp_path / "src")
    out = tmp_path / "out"
    m = convert_dataset(src, out, ConvertOptions(size=16, workers=2), progress=False)
    eps = list(iter_episodes(out))
    assert m["episodes"] == 4 and len(eps) == 4 and m["action_space"] == EEF7_ACTION_SPACE.to_json()
    for ep, v in zip(eps, raw):
        want = np.concatenate([v["steps/action/world_vector"], v["steps/action/rotation_delta"],
                               np.array([1, 0, 0, 0, 1, 1], np.float32)[:, None]], axis=1)
        np.testing.assert_array_equal(ep.actions, want)
        # registry's primary camera ("image"), centre-cropped 24x32 -> 24x24 -> 16x16
        np.testing.assert_array_equal(ep.frames, np.stack([_center_resize(_decode(b), 16)
                                                           for b in v["steps/observation/image"]]))
        assert ep.language == v["steps/observation/natural_language_instruction"][0].decode()
        np.testing.assert_array_equal(ep.success, [0, 0, 0, 0, 0, 1])
    assert m["extra"]["oxe"]["registry"]["frame_stride"] == 1  # 3 Hz: no stride


def test_stride_composes_actions(tmp_path, monkeypatch):
    src, raw = rt1_dataset(tmp_path / "src", n_files=1, per_file=1)
    out = tmp_path / "out"
    name = "fractal20220817_data"
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], frame_stride=4, camera="wrist_image"))
    convert_dataset(src, out, ConvertOptions(size=16, workers=1), progress=False)
    (ep,) = list(iter_episodes(out))
    v = raw[0]
    assert len(ep) == 2  # steps 0..3 and 4..5
    wv, rd = v["steps/action/world_vector"], v["steps/action/rotation_delta"]
    np.testing.assert_allclose(ep.actions[0, :3], wv[:4].sum(0), rtol=1e-5)
    np.testing.assert_allclose(ep.actions[1, :3], wv[4:].sum(0), rtol=1e-5)
    r = Rotation.identity()
    for a in rd[:4]:
        r = Rotation.from_euler("xyz", a) * r
    np.testing.assert_allclose(ep.actions[0, 3:6], r.as_euler("xyz"), atol=1e-5)
    np.testing.assert_array_equal(ep.actions[:, 6], [0, 1])   # last command of each group
    np.testing.assert_array_equal(ep.is_first, [True, False])
    np.testing.assert_array_equal(ep.is_last, [False, True])
    assert ep.rewards.tolist() == [0.0, 1.0] and ep.meta["control_hz"] == pytest.approx(3 / 4)
    # the wrist camera is 16x16 already: frames are the decoded images themselves
    np.testing.assert_array_equal(ep.frames, np.stack([_decode(v["steps/observation/wrist_image"][i])
                                                       for i in (0, 4)]))


def test_unregistered_dataset_or_missing_registry_key_fails_naming_it(tmp_path, capsys, monkeypatch):
    src, _ = rt1_dataset(tmp_path / "src")
    other = tmp_path / "src" / "my_robot_set" / "0.1.0"
    other.parent.mkdir()
    os.rename(src, other)
    assert main(["--src", str(other), "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "dataset 'my_robot_set' is not in the OXE registry" in capsys.readouterr().err
    # a registry entry naming keys features.json lacks: every such key is named
    name = "fractal20220817_data"
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], camera="front", language="instruction"))
    src, _ = rt1_dataset(tmp_path / "src2")
    with pytest.raises(ConversionError, match=r"fractal20220817_data' names camera 'steps/observation/front', "
                                              r"instruction 'steps/instruction', which features.json lacks"):
        convert_dataset(src, tmp_path / "out", ConvertOptions(size=16, workers=1), progress=False)


def test_missing_key_names_file_record_and_key(tmp_path):
    src, _ = rt1_dataset(tmp_path / "src", n_files=2, per_file=2, drop_key_at=1)
    with pytest.raises(RecordError) as e:  # raised in a worker process, arrives intact
        convert_dataset(src, tmp_path / "out", ConvertOptions(size=16, workers=2), progress=False)
    assert "fractal20220817_data-train.tfrecord-00000-of-00002: record 1: key 'steps/action/rotation_delta'" \
        in str(e.value)
    # the failed run's folder is resumed only with the same options: other options replace it explicitly
    with pytest.raises(ConversionError, match="written with another config"):
        convert_dataset(src, tmp_path / "out", ConvertOptions(size=8, workers=1), progress=False)


def test_undecodable_image_names_record_key_and_step(tmp_path):
    src, raw = rt1_dataset(tmp_path / "src", n_files=1, per_file=2)
    (f0, _), = source_files(src, "train")
    recs = list(iter_records(f0))
    ex = parse_example(recs[1])
    ex["steps/observation/image"][3] = b"\xff\xd8 not a jpeg"
    write_records(f0, [recs[0], build_example(ex)])
    with pytest.raises(RecordError, match=r"record 1: key 'steps/observation/image': step 3: image cannot"):
        convert_dataset(src, tmp_path / "out", ConvertOptions(size=16, workers=1), progress=False)


def test_crc_mismatch_and_truncation_fail_naming_file_record_and_offset(tmp_path, capsys):
    src, _ = rt1_dataset(tmp_path / "src", n_files=2, per_file=2)
    f0, f1 = [p for p, _ in source_files(src, "train")]
    good = f0.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 4] ^= 0xFF          # inside record 0's payload
    f0.write_bytes(bytes(raw))
    rc = main(["--src", str(src), "--out", str(tmp_path / "out"), "--size", "16", "-q", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{f0.name}: record 0 (byte offset 0): data CRC mismatch" in err
    f0.write_bytes(good)
    rec0 = len(next(iter_records(f1))) + 16
    f1.write_bytes(f1.read_bytes()[:-10])  # record 1 of file 1 truncated
    rc = main(["--src", str(src), "--out", str(tmp_path / "out2"), "--size", "16", "-q", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{f1.name}: record 1 (byte offset {rec0}): truncated record" in err


def test_promised_episode_count_is_checked(tmp_path):
    src, _ = rt1_dataset(tmp_path / "src", n_files=1, per_file=3)
    (f0, n), = source_files(src, "train")
    assert n == 3
    write_records(f0, list(iter_records(f0))[:2])  # a well-formed but shorter file
    with pytest.raises(ConversionError, match="promises 3 episodes"):
        convert_dataset(src, tmp_path / "out", ConvertOptions(size=16, workers=1), progress=False)


def test_missing_features_json(tmp_path, capsys):
    d = tmp_path / "x" / "1.0.0"
    d.mkdir(parents=True)
    assert main(["--src", str(d), "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "features.json: missing" in capsys.readouterr().err


def test_resume_after_interruption_gives_identical_output(tmp_path, monkeypatch):
    import whale_pl.data.oxe.convert as conv

    src, _ = rt1_dataset(tmp_path / "src", n_files=3, per_file=2)
    clean = tmp_path / "clean"
    convert_dataset(src, clean, ConvertOptions(size=16, workers=2), progress=False)
    # an interrupted run: file 1 finished its part, file 2 left a half-written part, no manifest
    out = tmp_path / "resumed"
    opts = ConvertOptions(size=16, workers=1)

    def interrupted(fn, jobs, workers):
        fn(jobs[1])
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "map_ordered", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(src, out, ConvertOptions(size=16, workers=2), progress=False)
    monkeypatch.undo()
    assert (out / PARTS / "train-00001" / "part.json").is_file()
    assert not (out / "manifest.json").exists()
    (out / PARTS / "train-00002").mkdir(parents=True)
    (out / PARTS / "train-00002" / "garbage").write_bytes(b"partial")
    (out / "shard-000000.tar").write_bytes(b"left by an interrupted merge")
    converted, to_episode = set(), conv.record_to_episode
    monkeypatch.setattr(conv, "record_to_episode", lambda data, schema, plan, where, *a:
                        converted.add(Path(where.path).name) or to_episode(data, schema, plan, where, *a))
    m = convert_dataset(src, out, opts, progress=False)
    assert converted == {p.name for p, _ in source_files(src, "train")[::2]}  # file 1's part is reused, not redone
    assert not (out / PARTS).exists()
    mc = verify_dataset(clean)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in mc["shards"]]
    assert [sha256_file(clean / s["name"]) for s in mc["shards"]] == [s["sha256"] for s in m["shards"]]
    # a different existing dataset is not overwritten silently
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_dataset(src, out, ConvertOptions(size=8, workers=1), progress=False)


def test_absolute_quaternion_pose_becomes_deltas():
    schema_feats = rw.features_json({"action": rw.tensor((8,)), "observation": {"image": rw.image(4, 4)},
                                     **_flag_schema()})
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "features.json").write_text(json.dumps(schema_feats))
        schema = load_schema(d)
    q = Rotation.from_euler("xyz", [[0, 0, 0], [0, 0, np.pi / 2], [0.1, 0, np.pi / 2]]).as_quat()
    pos = np.array([[0, 0, 0], [1, 0, 0], [1, 2, 0]], np.float64)
    act = np.concatenate([pos, q, np.array([[1], [0], [1]])], axis=1).astype(np.float32)
    ex = parse_example(rw.episode_record({"steps/action": act}))
    amap = ActionMap(xyz="action[0:3]", rot="action[3:7]", gripper="action[7]", gripper_mode="open",
                     rot_format="quat_xyzw", pose="absolute")
    a = standard_actions(ex, schema, amap, 3, Where("f", 0))
    np.testing.assert_allclose(a[:, :3], [[0, 0, 0], [1, 0, 0], [0, 2, 0]], atol=1e-6)
    np.testing.assert_allclose(a[1, 3:6], [0, 0, np.pi / 2], atol=1e-6)
    # R2 R1^-1 composed back onto R1 gives R2
    r1, r2 = Rotation.from_quat(q[1]), Rotation.from_quat(q[2])
    np.testing.assert_allclose((Rotation.from_euler("xyz", a[2, 3:6]) * r1).as_matrix(), r2.as_matrix(),
                               atol=1e-5)
    np.testing.assert_array_equal(a[:, 6], [1, 0, 1])


def test_relative_gripper_integration():
    np.testing.assert_array_equal(relative_gripper_to_absolute(np.array([0, 0, 1, 0, -1, 0.05])),
                                  [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(relative_gripper_to_absolute(np.array([0, -1, 0, 1])), [0, 1, 1, 0])
    np.testing.assert_array_equal(relative_gripper_to_absolute(np.zeros(3)), [1, 1, 1])
