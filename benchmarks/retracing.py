"""Cost of retracing-rollout uncertainty (K predictions from one model) against a deep ensemble
(N models from the same context), per imagined step, at the demo dynamics size.

    .venv/bin/python benchmarks/retracing.py [--K 3] [--members 5] [--batch 4] [--frames 12]

Random weights (cost does not depend on training): dim 128, depth 4, heads 4, 8x8 tokens, 512 codes,
max_frames 16 — stages/demo/dynamics.yaml. Prints ms per imagined step for each method and the
ratio; the last line is ``retracing_cost_ratio: <ensemble time / retracing time> x``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from whale_pl.data.episode import METAWORLD_ACTION_SPACE
from whale_pl.models.dynamics import DynamicsModel
from whale_pl.rollout.retracing import ActionNormaliser, ensemble_uncertainty, retracing_uncertainty


def build(seed: int) -> DynamicsModel:
    """A demo-size dynamics model with random weights."""
    torch.manual_seed(seed)
    return DynamicsModel(512, (8, 8), 4, dim=128, depth=4, heads=4, max_frames=16, max_stride=4).eval()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main() -> None:
    """Time both uncertainties on the same rollout; print the cost ratio last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    models = [build(s) for s in range(a.members)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (a.batch, a.frames, 8, 8), generator=g)
    acts = torch.randn(a.batch, a.frames, 4, generator=g)
    norm = ActionNormaliser(METAWORLD_ACTION_SPACE, np.zeros(4), np.ones(4))
    codes = torch.nn.functional.normalize(torch.randn(512, 16, generator=g), dim=-1)
    steps = a.frames - 1
    with torch.no_grad():
        t_r = timed(lambda: retracing_uncertainty(models[0], ids, acts, norm, first=1, K=a.K, codebook_VE=codes,
                                                  z_fn=None),
                    a.repeats)
        t_e = timed(lambda: ensemble_uncertainty(models, ids, acts, first=1, codebook_VE=codes,
                                                 z_fns=[None] * len(models)), a.repeats)
    print(f"torch threads {torch.get_num_threads()}, batch {a.batch}, {steps} imagined steps scored")
    print(f"retracing (K={a.K}, 1 model):  {1000 * t_r / steps:.1f} ms per step")
    print(f"ensemble  (N={a.members} models): {1000 * t_e / steps:.1f} ms per step")
    print(f"training cost ratio: {a.members} models against 1")
    print(f"retracing_cost_ratio: {t_e / t_r:.2f} x")


if __name__ == "__main__":
    main()
