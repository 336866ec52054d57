"""`whale eval gifs`: real-against-imagined rollout GIFs of held-out episodes, with the retracing
uncertainty curve (and the true per-step error) under them, plus a JSON index for the report.

    whale eval gifs --ckpt runs/demo/dynamics/checkpoints/best.ckpt \
        --shards data_shards/metaworld/demo --out runs/demo/gifs [--per-split 2] [--horizon 24]

Episodes are picked per split in manifest order (a new task and policy first) and imagined open loop on the
model's clock. Writes ``<out>/<split>_<i>_<task>_<policy>.gif`` and ``<out>/index.json``.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SPLITS = ("val", "ood")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "x"


def _task_policy(ep) -> tuple[str | None, str | None]:
    return ep.meta.get("task"), (ep.meta.get("policy") or {}).get("name")


def pick_episodes(dm, split: str, n: int, min_len: int) -> list:
    """``n`` episodes of ``split`` at least ``min_len`` long, in manifest order, preferring a task and a
    policy not yet picked (then a policy not yet picked, then any)."""
    eps = [ep for ep in dm.iter_episodes(split) if len(ep) >= min_len]
    chosen: list[int] = []
    for rule in ("both", "policy", "any"):
        for i, ep in enumerate(eps):
            if len(chosen) >= n:
                return [eps[j] for j in chosen]
            if i in chosen:
                continue
            task, pol = _task_policy(ep)
            new_task = task not in {_task_policy(eps[j])[0] for j in chosen}
            new_pol = pol not in {_task_policy(eps[j])[1] for j in chosen}
            if rule == "any" or (new_pol and (rule == "policy" or new_task)):
                chosen.append(i)
    return [eps[j] for j in chosen]


def _floats(x: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(x, dtype=np.float64).ravel()]


def on_model_clock(ep, start: int, n: int, k: int, space) -> tuple[np.ndarray, np.ndarray]:
    """``n`` frames of an episode from recorded frame ``start`` every ``k`` recorded steps, and the ``n - 1``
    raw actions between them, each composed over its ``k`` recorded steps."""
    from whale_pl.rollout.retracing import retracing_actions

    idx = start + k * np.arange(n)
    if idx[-1] >= len(ep):
        raise ValueError(f"episode of {len(ep)} frames has no {n} frames every {k} from {start}")
    # row j of the stride-k retracing-actions composes recorded steps j..j+k-1: every k-th row
    actions = retracing_actions(ep.actions[start : idx[-1]], space, k)[::k] if n > 1 else ep.actions[:0]
    return ep.frames[idx], actions.astype(np.float32)


def imagine_episode(wm, ep, start: int, context: int, horizon: int, K: int) -> dict:
    """Open-loop rollout of one episode from frame ``start`` on the model's clock, and its per-step figures:
    ``real_TCHW`` (uint8), ``imagined_TCHW`` ([-1, 1]), ``uncertainty_T`` (the retracing score, NaN where a
    step has < 2 anchors), ``disagreement_T``, ``entropy_T``, ``n_predictions_T``, ``mse_T``, ``psnr_T``."""
    import torch
    from einops import rearrange

    from whale_pl.data.frames import frames_to_unit

    frames, actions = on_model_clock(ep, start, context + horizon, wm.frame_stride, wm.normaliser.space)
    ctx = wm.tokenize(frames[None, :context])
    out = wm.imagine_open_loop(ctx, actions[None], horizon, composed=True)
    u = {k: v.cpu().numpy() for k, v in wm.step_uncertainty(ctx, out["ids_BThw"], out["actions_norm_BTA"], K=K).items()}
    imagined = wm.decode(out["ids_BThw"])[0]  # [H, 3, h, w] in [-1, 1]
    real = torch.as_tensor(rearrange(frames[context:], "t h w c -> t c h w").copy())
    mse = ((imagined - frames_to_unit(real.to(imagined.device))) ** 2).mean(dim=(1, 2, 3)).cpu().double().numpy()
    score = u["score_BT"][0].astype(np.float64)
    score[u["n_predictions_T"] < 2] = np.nan
    return {"real_TCHW": real.numpy(), "imagined_TCHW": imagined.cpu().numpy(), "uncertainty_T": score,
            "disagreement_T": u["disagreement_BT"][0], "entropy_T": u["entropy_BT"][0],
            "n_predictions_T": u["n_predictions_T"], "mse_T": mse,
            "psnr_T": 10 * np.log10(4.0 / np.maximum(mse, 1e-10))}


def clip_record(ep, split: str, name: str, start: int, context: int, horizon: int, K: int, r: dict) -> dict:
    """The index entry of one GIF: which episode, and its figures per step (``imagine_episode``'s ``r``)."""
    from whale_pl.rollout.value_metrics import spearman

    pol = ep.meta.get("policy") or {}
    u, e = r["uncertainty_T"], r["mse_T"]
    ok = np.isfinite(u) & np.isfinite(e)
    sp = spearman(u[ok], e[ok]) if ok.sum() >= 3 and np.ptp(u[ok]) > 0 and np.ptp(e[ok]) > 0 else math.nan
    return {
        "gif": name, "split": split, "task": ep.meta.get("task", "?"), "policy": pol.get("name"),
        "family": pol.get("family"), "episode": ep.meta.get("episode_id"), "start": start, "context": context,
        "horizon": horizon, "K": K, "psnr_mean": float(np.mean(r["psnr_T"])), "mse_mean": float(np.mean(e)),
        "uncertainty_mean": float(np.nanmean(u)) if np.isfinite(u).any() else None,
        "spearman_uncertainty_vs_mse": float(sp) if math.isfinite(sp) else None,
        "uncertainty": _floats(u), "disagreement": _floats(r["disagreement_T"]), "entropy": _floats(r["entropy_T"]),
        "n_predictions": [int(v) for v in r["n_predictions_T"]], "mse": _floats(e), "psnr": _floats(r["psnr_T"]),
    }


def _world_model_on(ckpt: str, shards: str, context: int | None, device: str):
    """The checkpoint's world model, the shards' datamodule (data_spec checked) and the context length."""
    from whale_pl.data.datamodule import ClipDataModule
    from whale_pl.lit.handoff import SPEC_KEYS, check_data_spec
    from whale_pl.rollout.value import WorldModel

    wm = WorldModel.load(ckpt, device)
    C = wm.module.loss_cfg.context_frames if context is None else int(context)
    if not 1 <= C <= wm.model.max_frames - 1:
        raise ValueError(f"context {C} must be in [1, max_frames - 1 = {wm.model.max_frames - 1}] for {ckpt}")
    dm = ClipDataModule(str(shards), num_workers=0, rank=0, world_size=1)
    check_data_spec(wm.module.hparams.get("data_spec"), dm.data_spec, where=f"{ckpt} on {shards}",
                    keys=[k for k in SPEC_KEYS if k in dm.data_spec])
    return wm, dm, C


def run(ckpt: str, shards: str, out: str | Path, splits: list[str] | tuple[str, ...] = DEFAULT_SPLITS,
        per_split: int = 2, horizon: int = 24, start: int = 0, context: int | None = None, K: int = 3,
        scale: int = 3, fps: float = 4.0, device: str = "cpu", command: str | None = None) -> dict:
    """Write the GIFs and ``index.json`` under ``out``; returns the index."""
    from whale_pl.io import write_json_atomic
    from whale_pl.rollout.gif import write_rollout_gif

    if per_split < 1 or horizon < 1 or start < 0:
        raise ValueError(f"per_split ({per_split}) and horizon ({horizon}) must be >= 1, start ({start}) >= 0")
    t0, out = time.time(), Path(out)
    wm, dm, C = _world_model_on(ckpt, shards, context, device)
    available, k = dm.manifest().get("splits", {}), wm.frame_stride
    clips = []
    for split in splits:
        if split not in available:
            raise ValueError(f"{shards}: no split {split!r} in manifest.json (has {sorted(available)})")
        need = start + C * k + 1  # C context frames and one imagined frame, every k recorded steps
        eps = pick_episodes(dm, split, per_split, need)
        if not eps:
            raise ValueError(f"{shards}: split {split!r} has no episode of >= {need} frames")
        for i, ep in enumerate(eps):
            H = min(horizon, (len(ep) - 1 - start) // k + 1 - C)
            r = imagine_episode(wm, ep, start, C, H, K)
            task, pol = ep.meta.get("task", "?"), (ep.meta.get("policy") or {}).get("name", "?")
            name = f"{_safe(split)}_{i:02d}_{_safe(task)}_{_safe(pol)}.gif"
            write_rollout_gif(out / name, r["real_TCHW"], r["imagined_TCHW"], r["uncertainty_T"], r["mse_T"],
                              scale=scale, fps=fps, title=f"{split} | {task} | {pol}", error_label="pixel MSE")
            clips.append(clip_record(ep, split, name, start, C, H, K, r))
            print(f"[gifs] {out / name}: PSNR {clips[-1]['psnr_mean']:.2f} dB, Spearman(u, MSE) "
                  f"{clips[-1]['spearman_uncertainty_vs_mse']}", flush=True)
    command = command or shlex.join([
        "whale", "eval", "gifs", "--ckpt", str(ckpt), "--shards", str(shards), "--out", str(out), "--splits", *splits,
        "--per-split", str(per_split), "--horizon", str(horizon), "--start", str(start),
        *(["--context", str(context)] if context is not None else []), "--K", str(K), "--scale", str(scale),
        "--fps", f"{fps:g}"])
    index = {"ckpt": str(ckpt), "shards": str(shards), "uses_behavior": wm.uses_behavior, "K": K,
             "command": command, "seconds": time.time() - t0, "clips": clips}
    write_json_atomic(out / "index.json", index)
    return index


def main(argv: list[str] | None = None) -> int:
    """``whale eval gifs`` (arguments: ``--help``)."""
    p = argparse.ArgumentParser(prog="whale eval gifs", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="dynamics-stage checkpoint")
    p.add_argument("--shards", required=True, help="dataset directory (shards + manifest.json)")
    p.add_argument("--out", required=True, help="directory for the GIFs and index.json")
    p.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="manifest splits to take episodes from")
    p.add_argument("--per-split", type=int, default=2)
    p.add_argument("--horizon", type=int, default=24, help="imagined steps (shorter episodes: what they have)")
    p.add_argument("--start", type=int, default=0, help="first frame of the context in each episode")
    p.add_argument("--context", type=int, default=None, help="real context frames (default: the model's)")
    p.add_argument("--K", type=int, default=3, help="retracing anchors per imagined step")
    p.add_argument("--scale", type=int, default=3, help="integer upscale of the frames")
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not Path(a.ckpt).is_file():
        p.error(f"checkpoint not found: {a.ckpt}")
    if not (Path(a.shards) / "manifest.json").is_file():
        p.error(f"no manifest.json in --shards {a.shards}")
    for name in ("per_split", "horizon", "K", "scale"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    cmd = "whale eval gifs " + shlex.join(sys.argv[1:] if argv is None else argv)
    index = run(a.ckpt, a.shards, a.out, a.splits, a.per_split, a.horizon, a.start, a.context, a.K, a.scale, a.fps,
                a.device, command=cmd)
    print(f"[gifs] wrote {len(index['clips'])} GIFs and {Path(a.out) / 'index.json'} in {index['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
