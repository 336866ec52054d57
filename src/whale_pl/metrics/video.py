"""PSNR and SSIM of video clips and an accumulator that also feeds FVD (docs/method.md, "Video metrics"), used by
the stage modules, the callback and `whale eval video`."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from whale_pl.data.frames import frames_to_unit
from whale_pl.metrics.fvd import FVD, I3D_MIN_FRAMES, warn_once

PSNR_CAP_DB = 100.0


def _images01(frames_BTCHW: torch.Tensor, name: str) -> torch.Tensor:
    if frames_BTCHW.ndim != 5 or frames_BTCHW.shape[2] != 3:
        raise ValueError(f"{name}: expected [B, T, 3, H, W], got shape {tuple(frames_BTCHW.shape)}")
    return rearrange((frames_to_unit(frames_BTCHW, name) + 1) / 2, "b t c h w -> (b t) c h w").float()


@torch.no_grad()
def video_psnr_ssim(real_BTCHW: torch.Tensor, fake_BTCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM, shaped [B, T] each (float64)."""
    if real_BTCHW.shape != fake_BTCHW.shape:
        raise ValueError(f"real {tuple(real_BTCHW.shape)} and generated {tuple(fake_BTCHW.shape)} clips "
                         "differ in shape")
    b = real_BTCHW.shape[0]
    real, fake = _images01(real_BTCHW, "real"), _images01(fake_BTCHW, "generated")
    with torch.autocast(real.device.type, enabled=False):  # bf16 ruins SSIM's variance terms
        psnr = peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
    return {k: rearrange(v.double(), "(b t) -> b t", b=b) for k, v in (("psnr", psnr), ("ssim", ssim))}


def psnr_ssim_per_sample(real_BTCHW: torch.Tensor, fake_BTCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip PSNR (dB; frames capped at ``PSNR_CAP_DB``) and SSIM averaged over the clip: ``(psnr_B, ssim_B)``."""
    scores = video_psnr_ssim(real_BTCHW, fake_BTCHW)
    return scores["psnr"].clamp(max=PSNR_CAP_DB).mean(1).float(), scores["ssim"].mean(1).float()


class VideoEvaluator:
    """Accumulates PSNR/SSIM per frame index and FVD features (unless `fvd` is None) of (real, generated) clips."""

    def __init__(self, fvd: FVD | None = None):
        self.fvd, self.fvd_skipped = fvd, False
        self.psnr: list[np.ndarray] = []  # [B, T] of each batch
        self.ssim: list[np.ndarray] = []

    def update(self, real_BTCHW: torch.Tensor, fake_BTCHW: torch.Tensor) -> None:
        """Score a batch of (real, generated) clips and feed their FVD features."""
        scores = video_psnr_ssim(real_BTCHW, fake_BTCHW)
        self.psnr.append(scores["psnr"].cpu().numpy())
        self.ssim.append(scores["ssim"].cpu().numpy())
        if self.fvd is not None and not self.fvd_skipped:
            if real_BTCHW.shape[1] < I3D_MIN_FRAMES:
                warn_once("short-clips", f"FVD skipped: clips have T={real_BTCHW.shape[1]} frames, I3D needs "
                          f">= {I3D_MIN_FRAMES}. PSNR/SSIM are still computed.")
                self.fvd_skipped = True
            else:
                self.fvd.update(real_BTCHW, fake_BTCHW)

    @property
    def num_clips(self) -> int:
        """Clips scored so far."""
        return sum(len(p) for p in self.psnr)

    def compute(self) -> dict:
        """psnr, ssim, their per-frame means, num_clips, psnr_capped, and fvd / fvd_num_clips when computed."""
        psnr_BT, ssim_BT = np.concatenate(self.psnr), np.concatenate(self.ssim)
        capped = int(np.sum(~np.isfinite(psnr_BT) | (psnr_BT > PSNR_CAP_DB)))
        psnr_BT = np.minimum(np.nan_to_num(psnr_BT, posinf=PSNR_CAP_DB), PSNR_CAP_DB)
        out: dict = {"psnr": float(psnr_BT.mean()), "ssim": float(ssim_BT.mean()),
                     "psnr_per_frame": psnr_BT.mean(axis=0).tolist(), "ssim_per_frame": ssim_BT.mean(axis=0).tolist(),
                     "num_clips": int(psnr_BT.shape[0]), "psnr_capped": capped}
        if self.fvd is not None and not self.fvd_skipped:
            if self.fvd.num_clips >= 2:
                out["fvd"], out["fvd_num_clips"] = self.fvd.compute(), self.fvd.num_clips
            else:
                warn_once("few-clips", f"FVD skipped: needs >= 2 clips, got {self.fvd.num_clips}.")
        return out

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.psnr.clear()
        self.ssim.clear()
        self.fvd_skipped = False
        if self.fvd is not None:
            self.fvd.reset()
