"""`whale eval gifs`: real-against-imagined rollout GIFs with the per-step uncertainty (and error) curve under them,
and ``index.json``. Frames are 256-colour palette images without dithering: few colours are stored exactly."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from whale_pl.data.datamodule import ClipDataModule
from whale_pl.data.frames import frames_to_uint8, frames_to_unit
from whale_pl.io import atomic_path, write_json_atomic
from whale_pl.rollout.retracing import retracing_actions
from whale_pl.rollout.value import WorldModel
from whale_pl.rollout.value_metrics import rank_corr

MARGIN, GAP, LABEL_H, FOOTER_H = 4, 4, 14, 14
CHROME_COLORS = 48
MIN_WIDTH = 360  # room for a readable plot under small frames
UNC_COLOR, ERR_COLOR, CURSOR_COLOR = "#1f77b4", "#d62728", (40, 40, 40)
SPLITS, PER_SPLIT, HORIZON, K, SCALE = ("val", "ood"), 2, 24, 3, 3  # episodes per split, imagined steps, anchors


@dataclass(frozen=True)
class GifLayout:
    """Pixel boxes ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a GIF frame's parts."""

    width: int
    height: int
    real: tuple[int, int, int, int]
    imagined: tuple[int, int, int, int]
    plot: tuple[int, int, int, int]


def layout(frame_hw: tuple[int, int], scale: int) -> GifLayout:
    """Where the title, the panels and the plot go for frames of ``frame_hw`` upscaled by ``scale``."""
    h, w = frame_hw[0] * scale, frame_hw[1] * scale
    width = max(MIN_WIDTH, 2 * MARGIN + 2 * w + GAP)
    left = (width - 2 * w - GAP) // 2  # panels centred
    ph = max(110, int(round(0.6 * h)))
    top = MARGIN + 2 * LABEL_H  # the title, then the panel labels
    real = (left, top, left + w, top + h)
    imag = (left + w + GAP, top, left + 2 * w + GAP, top + h)
    plot = (0, top + h + GAP, width, top + h + GAP + ph)
    return GifLayout(width, plot[3] + FOOTER_H + MARGIN, real, imag, plot)


def upscale(frame_HWC: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale: each pixel becomes a ``scale x scale`` block."""
    return np.repeat(np.repeat(frame_HWC, scale, axis=0), scale, axis=1)


def _axis(ax, steps: np.ndarray, values_T: np.ndarray, style: str, color: str, label: str, **kw) -> None:
    """One curve on its own y axis: limits around the finite values (8 % padding), label, 4 ticks."""
    ax.plot(steps, values_T, style, color=color, label=label, **kw)
    finite = values_T[np.isfinite(values_T)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(label, fontsize=7, color=color, labelpad=2)
    ax.tick_params(labelsize=6, pad=1, length=2)
    ax.yaxis.get_offset_text().set_fontsize(6)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))


def _curve_image(values_T: np.ndarray, error_T: np.ndarray | None, size: tuple[int, int],
                 label: str) -> tuple[np.ndarray, list[tuple[int, int | None, int | None]], tuple[int, int]]:
    """The plot as uint8 RGB ``[h, w, 3]``, per step its pixel (x, y of the uncertainty, y of the error;
    None where not finite), and the axes' vertical pixel extent (top, bottom)."""
    (w, h), T = size, len(values_T)
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.13, 0.24, 0.74 if error_T is not None else 0.83, 0.68))
    steps = np.arange(1, T + 1)
    _axis(ax, steps, values_T, "o-", UNC_COLOR, label, ms=2.5, lw=1.2)
    if not np.isfinite(values_T).any():
        ax.set_ylim(0, 1)
    ax.set_xlim(0.5, T + 0.5)
    ax.set_xlabel("imagined step", fontsize=7, labelpad=1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.grid(alpha=0.3, lw=0.5)
    ax2 = None if error_T is None else ax.twinx()
    if ax2 is not None:
        _axis(ax2, steps, error_T, "s--", ERR_COLOR, "pixel MSE", ms=2, lw=1.0)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    H_img = img.shape[0]

    def y_px(axis, t: int, values: np.ndarray) -> int | None:
        """The pixel row of a curve's point t (None where it is undefined)."""
        finite = np.isfinite(values[t])
        return int(round(H_img - axis.transData.transform((steps[t], values[t]))[1])) if finite else None

    points = [(int(round(ax.transData.transform((steps[t], 0.0))[0])), y_px(ax, t, values_T),
               y_px(ax2, t, error_T) if ax2 is not None else None) for t in range(T)]
    bb = ax.get_window_extent()
    rgb = np.full((h, w, 3), 255, np.uint8)  # dpi rounding: pad / crop to the exact box
    rgb[: min(h, H_img), : min(w, img.shape[1])] = img[:h, :w]
    return rgb, points, (int(round(H_img - bb.y1)), int(round(H_img - bb.y0)))


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3g}"


def write_rollout_gif(path: str | os.PathLike, real_TCHW, imagined_TCHW, uncertainty_T, error_T=None,
                      scale: int = 4, *, title: str, labels: tuple[str, str] = ("real", "imagined"),
                      uncertainty_label: str = "uncertainty") -> GifLayout:
    """Write the looping GIF (a frame per step, 4 fps) atomically; returns its layout. Frames ``[T, 3, H, W]``
    uint8 or float in [-1, 1]; ``uncertainty_T`` may hold NaN (no score: a gap); ``error_T``: pixel MSE."""
    real, imag = (frames_to_uint8(torch.as_tensor(np.asarray(f))).numpy().transpose(0, 2, 3, 1)
                  for f in (real_TCHW, imagined_TCHW))
    T = real.shape[0]
    u = np.asarray(uncertainty_T, np.float64)
    e = None if error_T is None else np.asarray(error_T, np.float64)
    lay = layout(real.shape[1:3], scale)
    x0, y0, x1, y1 = lay.plot
    curve, points, (ax_top, ax_bot) = _curve_image(u, e, (x1 - x0, y1 - y0), uncertainty_label)
    font = ImageFont.load_default()
    base = Image.new("RGB", (lay.width, lay.height), (255, 255, 255))
    draw = ImageDraw.Draw(base)
    draw.fontmode = "1"  # no antialiasing: text adds black only, leaving the palette to the frames
    draw.text((MARGIN, MARGIN), title, fill=(0, 0, 0), font=font)
    for (bx0, by0, bx1, _), text in ((lay.real, labels[0]), (lay.imagined, labels[1])):
        tw = draw.textlength(text, font=font)
        draw.text((bx0 + (bx1 - bx0 - tw) / 2, by0 - LABEL_H + 1), text, fill=(0, 0, 0), font=font)
    base.paste(Image.fromarray(curve), lay.plot[:2])
    # the static parts in CHROME_COLORS colours: a frame pair of up to 256 - CHROME_COLORS - 4 keeps its palette
    base = base.quantize(CHROME_COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).convert("RGB")
    frames = []
    for t in range(T):
        im = base.copy()
        im.paste(Image.fromarray(upscale(real[t], scale)), lay.real[:2])
        im.paste(Image.fromarray(upscale(imag[t], scale)), lay.imagined[:2])
        d = ImageDraw.Draw(im)
        d.fontmode = "1"
        px, py_u, py_e = points[t]
        d.line([(x0 + px, y0 + ax_top), (x0 + px, y0 + ax_bot)], fill=CURSOR_COLOR, width=1)
        for py, col in ((py_e, ERR_COLOR), (py_u, UNC_COLOR)):
            if py is not None:
                d.ellipse([x0 + px - 3, y0 + py - 3, x0 + px + 3, y0 + py + 3], fill=col, outline=(0, 0, 0))
        foot = f"step {t + 1}/{T}   uncertainty {_fmt(u[t])}" + ("" if e is None else f"   error {_fmt(e[t])}")
        d.text((MARGIN, y1 + 1), foot, fill=(0, 0, 0), font=font)
        frames.append(im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=250,
                       loop=0, optimize=False)
    return lay


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "x"


def pick_episodes(dm, split: str, n: int, min_len: int) -> list:
    """``n`` episodes of ``split`` of >= ``min_len`` frames, preferring a new task and policy, then a new policy."""
    eps = [ep for ep in dm.iter_episodes(split) if len(ep) >= min_len]
    keys, chosen = [(ep.meta.get("task"), (ep.meta.get("policy") or {}).get("name")) for ep in eps], []
    for rule in ("both", "policy", "any"):
        for i, (task, pol) in enumerate(keys):
            new_task, new_pol = all(task != keys[j][0] for j in chosen), all(pol != keys[j][1] for j in chosen)
            if len(chosen) < n and i not in chosen and (rule == "any" or (new_pol and (rule == "policy" or new_task))):
                chosen.append(i)
    return [eps[j] for j in chosen]


def _floats(x: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(x, dtype=np.float64).ravel()]


def on_model_clock(ep, n: int, k: int, space) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` frames of an episode every ``k`` steps and the ``n - 1`` raw actions composed between them."""
    idx = k * np.arange(n)
    # row j of the stride-k retracing-actions composes recorded steps j..j+k-1: every k-th row
    actions = retracing_actions(ep.actions[: idx[-1]], space, k)[::k] if n > 1 else ep.actions[:0]
    return ep.frames[idx], actions.astype(np.float32)


def imagine_episode(wm, ep, context: int, horizon: int) -> dict:
    """Open-loop rollout of an episode on the model's clock and its per-step figures: ``real_TCHW``, ``imagined_TCHW``,
    ``uncertainty_T`` (NaN where < 2 anchors), ``n_predictions_T``, ``mse_T``, ``psnr_T``."""
    frames, actions = on_model_clock(ep, context + horizon, wm.frame_stride, wm.normaliser.space)
    ctx = wm.tokenize(frames[None, :context])
    out = wm.imagine_open_loop(ctx, actions[None], horizon, composed=True)
    u = {k: v.cpu().numpy() for k, v in wm.step_uncertainty(ctx, out["ids_BThw"], out["actions_norm_BTA"], K=K).items()}
    imagined = wm.decode(out["ids_BThw"])[0]  # [H, 3, h, w] in [-1, 1]
    real = torch.as_tensor(rearrange(frames[context:], "t h w c -> t c h w").copy())
    mse = ((imagined - frames_to_unit(real.to(imagined.device))) ** 2).mean(dim=(1, 2, 3)).cpu().double().numpy()
    score = u["score_BT"][0].astype(np.float64)
    score[u["n_predictions_T"] < 2] = np.nan
    return {"real_TCHW": real.numpy(), "imagined_TCHW": imagined.cpu().numpy(), "uncertainty_T": score,
            "n_predictions_T": u["n_predictions_T"], "mse_T": mse,
            "psnr_T": 10 * np.log10(4.0 / np.maximum(mse, 1e-10))}


def clip_record(ep, split: str, name: str, context: int, horizon: int, r: dict) -> dict:
    """The index entry of one GIF: which episode, and its figures per step (``imagine_episode``'s ``r``)."""
    pol = ep.meta.get("policy") or {}
    u, e = r["uncertainty_T"], r["mse_T"]
    ok = np.isfinite(u) & np.isfinite(e)
    sp = float(rank_corr(u[ok], e[ok])) if ok.sum() >= 3 else math.nan  # NaN also where a side is constant
    return {
        "gif": name, "split": split, "task": ep.meta.get("task", "?"), "policy": pol.get("name"),
        "family": pol.get("family"), "episode": ep.meta.get("episode_id"), "start": 0, "context": context,
        "horizon": horizon, "K": K, "psnr_mean": float(np.mean(r["psnr_T"])), "mse_mean": float(np.mean(e)),
        "uncertainty_mean": float(np.nanmean(u)) if np.isfinite(u).any() else None,
        "spearman_uncertainty_vs_mse": sp if math.isfinite(sp) else None,
        "uncertainty": _floats(u), "n_predictions": [int(v) for v in r["n_predictions_T"]], "mse": _floats(e),
        "psnr": _floats(r["psnr_T"]),
    }


def write_gifs(ckpt: str, shards: str, out: str | Path, command: str, device: str = "cpu") -> dict:
    """GIFs of ``PER_SPLIT`` episodes of each of ``SPLITS`` and ``index.json`` under ``out``; returns the index."""
    t0, out = time.time(), Path(out)
    wm = WorldModel.load(ckpt, device)
    C, k = wm.module.loss_cfg.context_frames, wm.frame_stride
    dm = ClipDataModule(str(shards), num_workers=0, rank=0, world_size=1)
    wm.module.check_data(dm.data_spec, f"{ckpt} on {shards}")
    clips = []
    for split in SPLITS:
        eps = pick_episodes(dm, split, PER_SPLIT, C * k + 1)  # C context frames and one imagined frame
        if not eps:
            raise ValueError(f"{shards}: split {split!r} has no episode of >= {C * k + 1} frames (the manifest's "
                             f"splits: {sorted(dm.manifest().get('splits', {}))})")
        for i, ep in enumerate(eps):
            H = min(HORIZON, (len(ep) - 1) // k + 1 - C)
            r = imagine_episode(wm, ep, C, H)
            task, pol = ep.meta.get("task", "?"), (ep.meta.get("policy") or {}).get("name", "?")
            name = f"{split}_{i:02d}_{_safe(task)}_{_safe(pol)}.gif"
            write_rollout_gif(out / name, r["real_TCHW"], r["imagined_TCHW"], r["uncertainty_T"], r["mse_T"],
                              scale=SCALE, title=f"{split} | {task} | {pol}")
            clips.append(clip_record(ep, split, name, C, H, r))
            print(f"[gifs] {out / name}: PSNR {clips[-1]['psnr_mean']:.2f} dB, Spearman(u, MSE) "
                  f"{clips[-1]['spearman_uncertainty_vs_mse']}", flush=True)
    index = {"ckpt": str(ckpt), "shards": str(shards), "uses_behavior": wm.uses_behavior, "K": K,
             "command": command, "seconds": time.time() - t0, "clips": clips}
    write_json_atomic(out / "index.json", index)
    return index
