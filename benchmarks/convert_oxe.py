"""OXE (RLDS/TFRecord) -> shards conversion throughput: episodes/s and frames/s.

Default: synthetic JPEG episodes of ``--source-hw`` (256x320, the RT-1 camera size; 10 steps each) in BridgeData's
layout, ``--files`` TFRecord files x ``--copies`` x 25 episodes, converted end to end at ``--size`` (parse, CRC,
JPEG decode, centre-crop + resize, action mapping, shard writing, merge, manifest) with ``--workers`` processes.
``--bridge DIR`` (a BridgeData RLDS version directory, e.g. ``<rlds_root>/bridge_dataset/1.0.0``) instead
replicates that dataset's first training file.

    .venv/bin/python benchmarks/convert_oxe.py [--bridge DIR] [--files 8] [--copies 4] [--workers 2] [--size 64]

Last line: ``convert_oxe: <frames/s> frames/s``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from whale_pl.data.oxe.convert import ConvertOptions, convert_dataset
from whale_pl.data.oxe.tfrecord import iter_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rlds_fixtures as rw  # noqa: E402  (the RLDS writer of the test fixtures)


def replicate_bridge(bridge: Path, dst: Path, files: int, copies: int) -> int:
    """``files`` TFRecord files of ``copies`` x the first training file of ``bridge``; returns the episodes."""
    recs = list(iter_records(sorted(bridge.glob("bridge_dataset-train.tfrecord-*"))[0]))
    per_file = [recs * copies for _ in range(files)]
    rw.write_dataset(dst, json.loads((bridge / "features.json").read_text()), {"train": per_file})
    return sum(len(r) for r in per_file)


def synthetic(dst: Path, files: int, episodes: int, hw: tuple[int, int], t: int = 10) -> int:
    """``files`` TFRecord files of ``episodes`` smooth JPEG episodes of size ``hw``; returns the episodes."""
    rng = np.random.default_rng(0)
    h, w = hw
    feats = rw.features_json({"action": rw.tensor((7,)), "observation": {"image_0": rw.image(h, w)},
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
            "steps/observation/image_0": jpgs, "steps/is_first": np.arange(t) == 0,
            "steps/is_last": np.arange(t) == t - 1, "steps/is_terminal": np.arange(t) == t - 1,
            "steps/language_instruction": [b"synthetic"] * t}))
    rw.write_dataset(dst, feats, {"train": [recs] * files})
    return files * episodes


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the conversion's worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def main(argv: list[str] | None = None) -> None:
    """Build the source, convert it, print the throughput."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--copies", type=int, default=4, help="bridge: copies of the 25 episodes per file")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--source-hw", default="256x320", help="synthetic source frames HxW")
    p.add_argument("--bridge", type=Path, help="replicate this BridgeData RLDS directory instead")
    a = p.parse_args(argv)
    if a.bridge is not None and not (a.bridge / "features.json").is_file():
        sys.exit(f"--bridge {a.bridge}: no features.json (expected an RLDS version directory)")
    with tempfile.TemporaryDirectory(prefix="convert_oxe_") as tmp:
        src = Path(tmp) / "src" / "bridge_dataset" / "1.0.0"  # the registry entry the source's layout follows
        if a.bridge is None:
            hw = tuple(int(x) for x in a.source_hw.split("x"))
            n = synthetic(src, a.files, 25 * a.copies, hw)
            what = f"synthetic {hw[0]}x{hw[1]} JPEG"
        else:
            n = replicate_bridge(a.bridge, src, a.files, a.copies)
            what = f"{a.bridge} (replicated)"
        t0, cpu0 = time.perf_counter(), _cpu_s()
        m = convert_dataset(src, Path(tmp) / "out", ConvertOptions(size=a.size, workers=a.workers), progress=False)
        dt, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    assert m["episodes"] == n, (m["episodes"], n)
    print(f"source: {what}, {a.files} files, {n} episodes, {m['frames']} frames -> {a.size}x{a.size}, "
          f"{a.workers} workers")
    print(f"time: {dt:.2f} s wall, {cpu:.2f} CPU-s in all processes "
          f"({m['frames'] / cpu:.0f} frames per CPU-second; machine load shows as wall > CPU/{a.workers})")
    print(f"peak RSS of a worker process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    print(f"episodes/s: {m['episodes'] / dt:.1f}")
    print(f"convert_oxe: {m['frames'] / dt:.0f} frames/s")


if __name__ == "__main__":
    main()
