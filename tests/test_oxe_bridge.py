"""The real BridgeData sample (../shared/data/oxe/bridge_dataset/1.0.0) converts losslessly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from whale_pl.data.episode import EEF7_ACTION_SPACE
from whale_pl.data.oxe.cli import main
from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.tfrecord import iter_records
from whale_pl.data.shards import iter_episodes, verify_dataset

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"
pytestmark = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"real OXE sample data absent: {BRIDGE}")


def _source(split: str = "train") -> list[dict]:
    (path,) = sorted(BRIDGE.glob(f"bridge_dataset-{split}.tfrecord-*"))
    return [parse_example(r) for r in iter_records(path)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("oxe") / "bridge_dataset"
    rc = main(["--src", str(BRIDGE), "--out", str(out), "--size", "64", "--split", "train", "-q",
               "--workers", "1"])
    assert rc == 0
    return out


def test_all_train_episodes_arrive_with_source_actions_frames_language(converted):
    m = verify_dataset(converted)
    eps = list(iter_episodes(converted))
    src = _source()
    assert m["episodes"] == 25 and m["frames"] == 250 and len(eps) == 25
    assert m["frame_size"] == [64, 64] and m["action_space"] == EEF7_ACTION_SPACE.to_json()
    for ep, ex in zip(eps, src):
        assert len(ep) == 10
        # actions: the native 7-D layout is the standard one, copied bit for bit
        np.testing.assert_array_equal(ep.actions, ex["steps/action"].reshape(10, 7))
        # frames at native size (64 x 64): exactly the decoded source JPEGs of the primary camera
        dec = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                        for b in ex["steps/observation/image_0"]])
        np.testing.assert_array_equal(ep.frames, dec)
        assert ep.language == ex["steps/language_instruction"][0].decode()
        assert ep.language  # the sample has instructions
        np.testing.assert_array_equal(ep.is_first, ex["steps/is_first"] != 0)
        np.testing.assert_array_equal(ep.is_last, ex["steps/is_last"] != 0)
        np.testing.assert_array_equal(ep.rewards, ex["steps/reward"])
        assert ep.meta["control_hz"] == 5.0 and ep.meta["split"] == "train"
        assert ep.meta["policy"]["family"] == "bridge_dataset"


def test_manifest_statistics_and_provenance(converted):
    m = verify_dataset(converted)
    acts = np.concatenate([ex["steps/action"].reshape(-1, 7) for ex in _source()]).astype(np.float64)
    st = m["action_stats"]
    np.testing.assert_allclose(st["mean"], acts.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st["std"], acts.std(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(st["q01"], np.quantile(acts, 0.01, axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st["q99"], np.quantile(acts, 0.99, axis=0), rtol=1e-6, atol=1e-9)
    oxe = m["extra"]["oxe"]
    assert oxe["dataset"] == "bridge_dataset"
    assert oxe["registry"]["camera"] == "image_0" and "1 = open" in oxe["gripper_convention"]
    assert not (converted / ".parts").exists()


def test_rerun_is_a_no_op_and_val_split(converted, tmp_path):
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    assert main(["--src", str(BRIDGE), "--out", str(converted), "--size", "64", "-q"]) == 0
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before
    # train + val into one directory with both splits, resized
    out = tmp_path / "both"
    assert main(["--src", str(BRIDGE), "--out", str(out), "--split", "train,val", "--size", "32", "-q",
                 "--workers", "1"]) == 0
    m = verify_dataset(out)
    assert m["splits"]["train"]["episodes"] == 25 and m["splits"]["val"]["episodes"] == 25
    assert m["frame_size"] == [32, 32]
    ep = next(iter_episodes(out))
    src0 = _source()[0]
    full = np.asarray(Image.open(io.BytesIO(src0["steps/observation/image_0"][0])).convert("RGB"))
    want = np.asarray(Image.fromarray(full).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ep.frames[0], want)
    assert ep.meta["oxe"]["camera"] == "steps/observation/image_0"


def test_merged_bytes_equal_a_fresh_encoding(converted):
    """The merge copies part samples instead of re-compressing: they must be what encoding gives."""
    from whale_pl.data.episode import Episode
    from whale_pl.data.shards import iter_tar_samples

    m = verify_dataset(converted)
    n = 0
    for sh in m["shards"]:
        for s in iter_tar_samples(converted / sh["name"]):
            again = Episode.from_sample(s).to_sample(s["__key__"])
            assert all(again[k] == s[k] for k in ("frames.npz", "steps.npz", "meta.json"))
            n += 1
    assert n == 25


@pytest.mark.slow
def test_memory_stays_flat_with_dataset_size():
    """Streaming: a worker converting a 10x larger file peaks at about the same memory."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_oxe.py"
    peaks = []
    for copies in (1, 10):
        out = subprocess.run([sys.executable, str(bench), "--bridge", str(BRIDGE), "--files", "1", "--copies",
                              str(copies), "--workers", "2"], check=True, capture_output=True, text=True).stdout
        peaks.append(float(out.split("peak RSS of a worker process: ")[1].split(" MB")[0]))
    # 250 episodes hold ~9 MB of decoded frames and ~27 MB of JPEG records: kept in memory they
    # would show; streamed, the peak grows by less than that
    assert peaks[1] - peaks[0] < 8, peaks
