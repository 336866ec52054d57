"""Frames as stored (uint8 in [0, 255]) and as the models see them (float in [-1, 1]): every stage, metric and
picture converts through these two functions, so ``x = u / 127.5 - 1`` exists once."""

from __future__ import annotations

import torch


def frames_to_unit(frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
    """uint8 frames -> float32 in [-1, 1]; float frames must already lie in [-1, 1] (returned as float32)."""
    if frames.dtype == torch.uint8:
        return frames.float() / 127.5 - 1.0
    if not frames.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or float frames, got {frames.dtype}")
    lo, hi = frames.min().item(), frames.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name}: float frames must lie in [-1, 1], got [{lo:.3f}, {hi:.3f}]")
    return frames.float().clamp(-1, 1)


def frames_to_uint8(frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
    """The inverse: float frames in [-1, 1] (clipped) -> uint8, rounded to the nearest level; uint8 as is."""
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or float frames, got {frames.dtype}")
    if not bool(torch.isfinite(frames).all()):
        raise ValueError(f"{name} has non-finite values")
    return ((frames.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
