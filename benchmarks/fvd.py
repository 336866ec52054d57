"""Seconds for one FVD evaluation: 64 real + 64 generated clips of 16 frames at 64x64 (uint8).

I3D features of both sets (resize to 224, Kinetics-400 logits) and the Fréchet distance; the weight
load is timed separately. Run it with nothing else on the machine: it keeps both cores busy.
Last line: `fvd_64x16: <seconds> s`.
"""

from __future__ import annotations

import argparse
import time

import torch

from whale_pl.metrics.fvd import FVD
from whale_pl.metrics.i3d import load_i3d


def clips(n: int, T: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, T, 3, size, size]: moving gratings with per-clip frequency, velocity and phase."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T).view(1, T, 1, 1, 1).float()
    y = torch.arange(size).view(1, 1, 1, size, 1).float()
    x = torch.arange(size).view(1, 1, 1, 1, size).float()
    f = 0.05 + 0.3 * torch.rand(n, 1, 3, 1, 1, generator=g)
    v = 2 * torch.rand(n, 1, 3, 1, 1, generator=g) - 1
    ph = 6.28 * torch.rand(n, 1, 3, 1, 1, generator=g)
    return ((torch.sin(f * (x + 0.7 * y) + v * t + ph) + 1) * 127.5).round().to(torch.uint8)


def main() -> None:
    """Time the weight load, the I3D features of both sets and the distance."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    t0 = time.perf_counter()
    fvd = FVD(load_i3d(), batch_size=a.batch_size)
    load_s = time.perf_counter() - t0
    real = clips(a.clips, a.frames, a.size, seed=0)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1)) * 20
    fake = (real.float() + noise).clamp(0, 255).round().to(torch.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; weights loaded in {load_s:.1f} s")
    t0 = time.perf_counter()
    for i in range(0, a.clips, a.batch_size):
        fvd.update(real[i:i + a.batch_size], fake[i:i + a.batch_size])
        done = min(i + a.batch_size, a.clips)
        print(f"  {2 * done}/{2 * a.clips} clips, {time.perf_counter() - t0:.1f} s", flush=True)
    t1 = time.perf_counter()
    value = fvd.compute()
    total = time.perf_counter() - t0
    print(f"FVD = {value:.2f}; I3D {t1 - t0:.1f} s ({(t1 - t0) / (2 * a.clips):.3f} s/clip), "
          f"Fréchet distance {time.perf_counter() - t1:.3f} s")
    print(f"fvd_{a.clips}x{a.frames}: {total:.1f} s")


if __name__ == "__main__":
    main()
