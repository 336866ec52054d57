"""Image-grid helpers for TensorBoard: originals beside reconstructions / predictions."""

from __future__ import annotations

import torch
from einops import rearrange


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] (float) or uint8 [0, 255] -> float in [0, 1]."""
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0
    return ((frames.float() + 1) / 2).clamp(0, 1)


def paired_video_grid(
    top_BTCHW: torch.Tensor, bottom_BTCHW: torch.Tensor, max_clips: int = 4, max_frames: int = 8, pad: int = 1
) -> torch.Tensor:
    """One image [3, H', W'] in [0, 1]: for each clip a row of ``top`` frames above a row of
    ``bottom`` frames (e.g. originals above reconstructions), time running left to right."""
    if top_BTCHW.shape != bottom_BTCHW.shape:
        raise ValueError(f"grid halves differ in shape: {tuple(top_BTCHW.shape)} vs {tuple(bottom_BTCHW.shape)}")
    top = to_unit(top_BTCHW[:max_clips, :max_frames]).cpu()
    bot = to_unit(bottom_BTCHW[:max_clips, :max_frames]).cpu()
    rows = torch.stack([top, bot], dim=1)  # [B, 2, T, C, H, W]
    rows = torch.nn.functional.pad(rows, (pad, pad, pad, pad), value=1.0)
    return rearrange(rows, "b r t c h w -> c (b r h) (t w)")


def log_image(module, tag: str, image_CHW: torch.Tensor) -> bool:
    """Write an image to the module's TensorBoard logger at the current global step. Returns False
    (and writes nothing) when the run has no logger that takes images."""
    logger = getattr(module, "logger", None)
    exp = getattr(logger, "experiment", None) if logger is not None else None
    if exp is None or not hasattr(exp, "add_image"):
        return False
    exp.add_image(tag, image_CHW, global_step=module.global_step)
    return True
