"""Imagined frames per second of ``DynamicsModel.imagine``, with and without the temporal KV cache.

Builds the dynamics model at the size a stage config names (default: stages/demo/dynamics.yaml,
with the demo token grid and codebook), random weights, and rolls out ``--horizon`` frames from one
context frame, ``--steps`` MaskGIT steps per frame. Both paths run with the same sampling seed and
must produce the same frames (checked; the script fails otherwise). Token ids and rollouts only —
the tokenizer's decode is not part of the figure.

    .venv/bin/python benchmarks/imagine.py [--config stages/demo/dynamics.yaml] [--batch 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from whale_pl.models.dynamics import DynamicsModel

MODEL_KEYS = ("dim", "depth", "heads", "max_frames", "max_stride")


def build(cfg_path: Path, codebook: int, grid: int, action_dim: int, z_dim: int, state_dim: int) -> DynamicsModel:
    """The dynamics model at the size the stage config names, random weights, in eval mode."""
    init = yaml.safe_load(cfg_path.read_text())["model"]["init_args"]
    kw = {k: init["net"][k] for k in MODEL_KEYS if k in init.get("net", {})}
    return DynamicsModel(codebook, (grid, grid), action_dim, behavior_dim=z_dim if init.get("use_behavior", True) else 0,
                         state_dim=state_dim, **kw).eval()


def timed(model: DynamicsModel, ctx, act, z, horizon: int, steps: int, use_cache: bool, bf16: bool):
    """One seeded rollout and its wall-clock seconds."""
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        out = model.imagine(ctx, act, z, horizon=horizon, steps=steps, temperature=1.0, use_cache=use_cache, generator=g)
        return out, time.perf_counter() - t0


def main() -> None:
    """Roll out with and without the cache; check they agree; print frames/s last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("stages/demo/dynamics.yaml"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--codebook", type=int, default=512)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--action-dim", type=int, default=4)
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--state-dim", type=int, default=39)
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on the shared 2-core box 2 threads were several times slower)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = build(a.config, a.codebook, a.grid, a.action_dim, a.z_dim, a.state_dim)
    n_params = sum(p.numel() for p in m.parameters())
    ctx = torch.randint(0, a.codebook, (a.batch, 1, a.grid, a.grid))
    T = 1 + a.horizon
    act = torch.randn(a.batch, T, a.action_dim)
    z = torch.randn(a.batch, T, a.z_dim) if m.uses_behavior else None
    timed(m, ctx, act, z, 2, a.steps, True, a.bf16)  # warm-up
    cached, t_c = timed(m, ctx, act, z, a.horizon, a.steps, True, a.bf16)
    plain, t_p = timed(m, ctx, act, z, a.horizon, a.steps, False, a.bf16)
    same = torch.equal(cached["ids_BThw"], plain["ids_BThw"])
    frac = (cached["ids_BThw"] == plain["ids_BThw"]).float().mean().item()
    n = a.batch * a.horizon
    print(f"model {a.config} ({n_params / 1e6:.2f} M params), batch {a.batch}, horizon {a.horizon} "
          f"(max_frames {m.max_frames}), {a.steps} MaskGIT steps/frame, {a.grid}x{a.grid} tokens, "
          f"threads {torch.get_num_threads()}, bf16 {a.bf16}")
    print(f"without cache: {n / t_p:.1f} frames/s ({t_p:.2f} s)")
    print(f"with cache:    {n / t_c:.1f} frames/s ({t_c:.2f} s), speed-up x{t_p / t_c:.2f}")
    print(f"same frames with and without cache: {same} (token agreement {frac:.4f})")
    if not same and not a.bf16:
        raise SystemExit("cached and uncached rollouts differ")
    print(f"imagine_cached: {n / t_c:.1f} frames/s")


if __name__ == "__main__":
    main()
