"""A mixture of two converted OXE datasets feeds the ClipDataModule with per-dataset weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from whale_pl.data.oxe.cli import main

from test_oxe_fixtures import rt1_dataset  # noqa: E402  (tests/ is on sys.path under pytest)

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"
pytestmark = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"real OXE sample data absent: {BRIDGE}")


def read_mixture(out: Path) -> tuple[list[str], list[float]]:
    """A converted mixture's dataset directories and weights (ClipDataModule's ``dirs`` and ``weights``)."""
    m = json.loads((Path(out) / "mixture.json").read_text())
    assert m["kind"] == "whale_pl.mixture" and m["version"] == 1
    return [str(Path(out) / d["path"]) for d in m["datasets"]], [float(d["weight"]) for d in m["datasets"]]


def test_mixture_of_bridge_and_rt1_feeds_clip_datamodule(tmp_path):
    from whale_pl.data.datamodule import ClipDataModule

    root = tmp_path / "rlds"
    rt1_dataset(root, n_files=2, per_file=3)                        # root/fractal20220817_data/0.1.0
    (root / "bridge_dataset").mkdir()
    os.symlink(BRIDGE, root / "bridge_dataset" / "1.0.0")           # the real sample, read in place
    out = tmp_path / "shards"
    assert main(["--root", str(root), "--datasets", "bridge_dataset:3,fractal20220817_data", "--out", str(out),
                 "--size", "16", "-q", "--workers", "1"]) == 0
    mix = json.loads((out / "mixture.json").read_text())
    assert [(d["name"], d["weight"], d["episodes"]) for d in mix["datasets"]] == \
        [("bridge_dataset", 3.0, 25), ("fractal20220817_data", 0.54087122203, 6)]  # registry default
    dirs, weights = read_mixture(out)
    dm_yaml = yaml.safe_load((out / "datamodule.yaml").read_text())
    assert dm_yaml["class_path"] == "whale_pl.data.datamodule.ClipDataModule"
    assert dm_yaml["init_args"] == {"dirs": dirs, "weights": weights}

    dm = ClipDataModule(dirs=dirs, weights=weights, clip_len=4, batch_size=16, num_workers=0,
                        steps_per_epoch=20, rank=0, world_size=1)
    dm.setup("fit")
    spec = dm.data_spec
    assert [(d["name"], d["weight"]) for d in spec["datasets"]] == list(zip(["bridge_dataset",
                                                                            "fractal20220817_data"], weights))
    assert spec["frame_size"] == [16, 16] and spec["action_dim"] == 7
    assert spec["families"] == ["bridge_dataset", "fractal20220817_data"]
    counts = np.zeros(2)
    for batch in dm.train_dataloader():
        assert batch["frames"].shape == (16, 4, 3, 16, 16)
        ds = batch["dataset"].numpy()
        counts += np.bincount(ds, minlength=2)
        # each dataset normalised with its own statistics; the gripper (index 6) left raw
        for i, d in enumerate(spec["datasets"]):
            sel = ds == i
            raw = batch["actions_raw"][sel].numpy()
            want = (raw - np.asarray(d["action_mean"])) / np.asarray(d["action_std"])
            np.testing.assert_allclose(batch["actions"][sel].numpy(), want, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(batch["actions"][sel][..., 6].numpy(), raw[..., 6])
    share = counts[0] / counts.sum()
    expect = weights[0] / sum(weights)                              # 3 / 3.54 = 0.847
    assert counts.sum() == 320 and abs(share - expect) < 0.06, (share, expect)
