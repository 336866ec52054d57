"""OXE (RLDS/TFRecord) -> shards conversion throughput: episodes/s and frames/s.

Default: the real BridgeData sample (../shared/data/oxe/bridge_dataset/1.0.0, 64x64 JPEG cameras,
10-step episodes) is replicated into a temporary RLDS directory of ``--files`` TFRecord files x
``--copies`` x 25 episodes, then converted end to end at 64x64 (parse, CRC, JPEG decode, action
mapping, shard writing, merge, manifest) with ``--workers`` processes.
``--source-hw 256x320`` instead writes synthetic JPEG episodes of that size (the RT-1 camera size),
to measure the decode + centre-crop + resize path.

    .venv/bin/python benchmarks/convert_oxe.py [--files 8] [--copies 4] [--workers 2] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from whale_pl.data.oxe import rlds_writer as rw
from whale_pl.data.oxe.convert import ConvertOptions, convert_dataset
from whale_pl.data.oxe.tfrecord import iter_records

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"


def replicate_bridge(dst: Path, files: int, copies: int) -> int:
    (src,) = sorted(BRIDGE.glob("bridge_dataset-train.tfrecord-*"))
    recs = list(iter_records(src))
    d = dst / "bridge_dataset" / "1.0.0"
    d.mkdir(parents=True)
    shutil.copy(BRIDGE / "features.json", d / "features.json")
    per_file = [recs * copies for _ in range(files)]
    rw.write_dataset(d, json.loads((BRIDGE / "features.json").read_text()), {"train": per_file},
                     name="bridge_dataset")
    return sum(len(r) for r in per_file)


def synthetic(dst: Path, files: int, episodes: int, hw: tuple[int, int], t: int = 10) -> int:
    rng = np.random.default_rng(0)
    h, w = hw
    feats = rw.features_json({"action": rw.tensor((7,)), "observation": {"image": rw.image(h, w)},
                              "is_first": rw.scalar("bool"), "is_last": rw.scalar("bool"),
                              "is_terminal": rw.scalar("bool"), "language_instruction": rw.text()})
    # smooth images (JPEG-typical content), a few distinct ones reused across episodes
    yy, xx = np.mgrid[0:h, 0:w]
    base = [np.stack([(np.sin(xx / (7 + i) + yy / 11) * 120 + 128), (xx * 255 // w + 0 * yy),
                      (yy * 255 // h + 0 * xx)], -1).astype(np.uint8) for i in range(t)]
    jpgs = [rw.encode_image(b, quality=90) for b in base]
    recs = []
    for _ in range(episodes):
        recs.append(rw.episode_record({
            "steps/action": rng.normal(size=(t, 7)).astype(np.float32),
            "steps/observation/image": jpgs, "steps/is_first": np.arange(t) == 0,
            "steps/is_last": np.arange(t) == t - 1, "steps/is_terminal": np.arange(t) == t - 1,
            "steps/language_instruction": [b"synthetic"] * t}))
    d = rw.write_dataset(dst / "synthetic_rt1" / "1.0.0", feats, {"train": [recs] * files})
    return files * episodes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--copies", type=int, default=4, help="bridge: copies of the 25 episodes per file")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--source-hw", help="synthetic source frames HxW (e.g. 256x320) instead of bridge")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="convert_oxe_") as tmp:
        tmp = Path(tmp)
        if a.source_hw:
            hw = tuple(int(x) for x in a.source_hw.split("x"))
            n = synthetic(tmp / "src", a.files, 25 * a.copies, hw)
            src = tmp / "src" / "synthetic_rt1" / "1.0.0"
            what = f"synthetic {hw[0]}x{hw[1]} JPEG"
        else:
            if not BRIDGE.is_dir():
                sys.exit(f"bridge sample absent: {BRIDGE}")
            n = replicate_bridge(tmp / "src", a.files, a.copies)
            src = tmp / "src" / "bridge_dataset" / "1.0.0"
            what = "bridge 64x64 JPEG (replicated)"
        timing: dict = {}
        t0 = time.perf_counter()
        m = convert_dataset(src, tmp / "out", ConvertOptions(size=a.size, workers=a.workers), progress=False,
                            timing=timing)
        dt = time.perf_counter() - t0
    assert m["episodes"] == n, (m["episodes"], n)
    print(f"source: {what}, {a.files} files, {n} episodes, {m['frames']} frames -> {a.size}x{a.size}, "
          f"{a.workers} workers")
    print(f"time: {dt:.2f} s wall, {timing['cpu_s']:.2f} CPU-s in all processes "
          f"({m['frames'] / timing['cpu_s']:.0f} frames per CPU-second; machine load shows as wall > CPU/{a.workers})")
    print(f"episodes/s: {m['episodes'] / dt:.1f}")
    print(f"convert_oxe: {m['frames'] / dt:.0f} frames/s")


if __name__ == "__main__":
    main()
