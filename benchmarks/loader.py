"""Clip loading throughput: clips/s of 16 frames at 64x64 from the demo Meta-World shards, 2 workers.

Uses ``stages/demo/data.yaml``'s dataset (collected first if absent, ~1.5 min). Times batches of
32 clips through ``MetaWorldDataModule.train_dataloader()`` (decode, clip cut, normalisation,
collation, worker -> main transfer) after a warm-up.
Run: ``flock /tmp/whale_heavy.lock .venv/bin/python benchmarks/loader.py``. Target: >= 1000 clips/s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS, WARMUP, WORKERS, CLIP = 32, 160, 10, 2, 16


def main() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.chdir(ROOT)
    from whale_pl.data.datamodule import MetaWorldDataModule

    dm = MetaWorldDataModule("stages/demo/data.yaml", clip_len=CLIP, batch_size=BATCH, num_workers=WORKERS,
                             steps_per_epoch=STEPS + WARMUP)
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(WARMUP):
        b = next(it)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b["frames"].shape[0]
    dt = time.perf_counter() - t0
    print(f"{n} clips of {tuple(b['frames'].shape[1:])} uint8 in {dt:.2f} s with {WORKERS} workers, batch {BATCH}")
    print(f"load average: {os.getloadavg()[0]:.1f} (other processes on the 2 cores lower this figure)")
    print(f"loader: {n / dt:.0f} clips/s")


if __name__ == "__main__":
    main()
