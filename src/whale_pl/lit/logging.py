"""Image grids for TensorBoard: real frames above reconstructed / imagined ones."""

from __future__ import annotations

import torch
from einops import rearrange

from whale_pl.data.frames import frames_to_unit


def paired_video_grid(
    top_BTCHW: torch.Tensor, bottom_BTCHW: torch.Tensor, max_clips: int = 4, max_frames: int | None = 8, pad: int = 1
) -> torch.Tensor:
    """One image [3, H', W'] in [0, 1]: for each clip a row of ``top`` frames above a row of
    ``bottom`` frames (e.g. originals above reconstructions), time running left to right.
    Frames are uint8 or float in [-1, 1]; ``max_frames=None`` shows every frame."""
    if top_BTCHW.shape != bottom_BTCHW.shape:
        raise ValueError(f"grid halves differ in shape: {tuple(top_BTCHW.shape)} vs {tuple(bottom_BTCHW.shape)}")
    halves = [(frames_to_unit(x[:max_clips, :max_frames]).cpu() + 1) / 2 for x in (top_BTCHW, bottom_BTCHW)]
    rows = torch.stack(halves, dim=1)  # [B, 2, T, C, H, W]
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
