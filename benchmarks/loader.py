"""Clip loading throughput: clips/s of 16 frames at 64x64 from the demo Meta-World shards, 2 workers.

Uses ``stages/demo/data.yaml``'s dataset (collected first if absent, ~1.5 min). Times batches of
32 clips through ``MetaWorldDataModule.train_dataloader()`` (decode, clip cut, normalisation,
collation, worker -> main transfer) after a warm-up.
Run: ``.venv/bin/python benchmarks/loader.py`` (on an otherwise idle machine). Target: >= 1000 clips/s.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS, WARMUP, WORKERS, CLIP = 32, 160, 10, 2, 16


def main() -> None:
    """Time the demo loader after a warm-up; print clips/s last."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.chdir(ROOT)
    from whale_pl.data.datamodule import MetaWorldDataModule

    dm = MetaWorldDataModule("stages/demo/data.yaml", clip_len=CLIP, batch_size=BATCH, num_workers=WORKERS,
                             steps_per_epoch=STEPS + WARMUP)
    dm.prepare_data()
    dm.setup("fit")
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    it = iter(dm.train_dataloader())
    for _ in range(WARMUP):
        b = next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in it:
        n += b["frames"].shape[0]
    dt, main_cpu = time.perf_counter() - t0, time.process_time() - c0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers have exited: their whole lives, warm-up included
    worker_cpu = (kids.ru_utime - kids0.ru_utime) + (kids.ru_stime - kids0.ru_stime)
    print(f"{n} clips of {tuple(b['frames'].shape[1:])} uint8 in {dt:.2f} s with {WORKERS} workers, batch {BATCH}")
    print(f"CPU: workers {worker_cpu:.2f} s (incl. warm-up), main {main_cpu:.2f} s -> "
          f"{n / (worker_cpu + main_cpu):.0f} clips per CPU-second (2 free cores: ~{2 * n / (worker_cpu + main_cpu):.0f} clips/s)")
    print(f"load average: {os.getloadavg()[0]:.1f} (other processes on the 2 cores lower this figure)")
    print(f"loader: {n / dt:.0f} clips/s")


if __name__ == "__main__":
    main()
