"""Image grids for TensorBoard: real frames above reconstructed / imagined ones."""

from __future__ import annotations

import torch
from einops import rearrange

from whale_pl.data.frames import frames_to_unit


def paired_video_grid(top_BTCHW: torch.Tensor, bottom_BTCHW: torch.Tensor, max_clips: int = 4,
                      max_frames: int | None = 8) -> torch.Tensor:
    """One image [3, H', W'] in [0, 1]: per clip a row of ``top`` frames above a row of ``bottom`` frames,
    time running left to right. Frames are uint8 or float in [-1, 1]; ``max_frames=None`` shows all."""
    halves = [(frames_to_unit(x[:max_clips, :max_frames]).cpu() + 1) / 2 for x in (top_BTCHW, bottom_BTCHW)]
    rows_B2TCHW = torch.nn.functional.pad(torch.stack(halves, dim=1), (1, 1, 1, 1), value=1.0)
    return rearrange(rows_B2TCHW, "b r t c h w -> c (b r h) (t w)")


def log_image(module, tag: str, image_CHW: torch.Tensor) -> None:
    """Write an image to the module's TensorBoard logger at the current step (when it takes images)."""
    exp = getattr(getattr(module, "logger", None), "experiment", None)
    if hasattr(exp, "add_image"):
        exp.add_image(tag, image_CHW, global_step=module.global_step)
