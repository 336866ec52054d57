"""PSNR/SSIM over videos: known values, per-frame resolution, dtype handling, the accumulator."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from whale_pl.metrics import fvd as fvd_mod
from whale_pl.metrics.fvd import FVDSkippedWarning
from whale_pl.metrics.video import PSNR_CAP_DB, VideoEvaluator, psnr_ssim_per_sample, video_psnr_ssim


def _clips(b=2, t=5, h=24, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 236, (b, t, 3, h, w), dtype=torch.uint8, generator=g)


def test_psnr_known_value_and_per_frame():
    real = _clips()
    fake = real.clone()
    fake[:, 2] += 10  # only frame 2 differs, by 10 grey levels everywhere
    s = video_psnr_ssim(real, fake)
    assert s["psnr"].shape == (2, 5) and s["ssim"].shape == (2, 5)
    expected = 10 * math.log10(1 / (10 / 255) ** 2)
    assert torch.allclose(s["psnr"][:, 2], torch.full((2,), expected, dtype=torch.float64), atol=1e-3)
    assert torch.isinf(s["psnr"][:, [0, 1, 3, 4]]).all()
    assert torch.allclose(s["ssim"][:, [0, 1, 3, 4]], torch.ones(2, 4, dtype=torch.float64))
    assert (s["ssim"][:, 2] < 1).all()


def test_uint8_and_float_agree():
    real, fake = _clips(seed=1), _clips(seed=2)
    a = video_psnr_ssim(real, fake)
    b = video_psnr_ssim(real.float() / 127.5 - 1, fake.float() / 127.5 - 1)
    assert torch.allclose(a["psnr"], b["psnr"], atol=1e-4) and torch.allclose(a["ssim"], b["ssim"], atol=1e-5)


def test_bad_input_is_an_error():
    real = _clips()
    with pytest.raises(ValueError, match="differ in shape"):
        video_psnr_ssim(real, real[:, :4])
    with pytest.raises(ValueError, match=r"generated: float frames must lie in \[-1, 1\]"):
        video_psnr_ssim(real, real.float())
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        video_psnr_ssim(real[:, :, :1], real[:, :, :1])


def test_evaluator_accumulates_means_per_frame_and_caps_exact_matches(monkeypatch):
    monkeypatch.setattr(fvd_mod, "_warned", set())
    real = _clips(b=3)
    noisy = (real.float() / 127.5 - 1 + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(3)))
    noisy = noisy.clamp(-1, 1)
    ev = VideoEvaluator()
    ev.update(real[:2], noisy[:2])
    ev.update(real[2:], real[2:])  # exact: PSNR capped, counted
    out = ev.compute()
    direct = video_psnr_ssim(real[:2], noisy[:2])
    psnr = np.concatenate([direct["psnr"].numpy(), np.full((1, 5), PSNR_CAP_DB)])
    assert out["num_clips"] == 3 and out["psnr_capped"] == 5 and "fvd" not in out
    assert out["psnr"] == pytest.approx(psnr.mean(), rel=1e-9)
    assert out["psnr_per_frame"] == pytest.approx(list(psnr.mean(0)), rel=1e-9)
    assert out["ssim"] == pytest.approx((direct["ssim"].sum().item() + 5) / 15, rel=1e-9)
    ev.reset()
    assert ev.num_clips == 0


def test_short_clips_skip_fvd_once_and_keep_psnr(monkeypatch):
    monkeypatch.setattr(fvd_mod, "_warned", set())

    class NoFeatures:  # never reached: 5-frame clips are rejected before any I3D call
        def update(self, *a):
            raise AssertionError("FVD must not run on clips shorter than 9 frames")

    ev = VideoEvaluator(NoFeatures())
    with pytest.warns(FVDSkippedWarning, match="T=5"):
        ev.update(_clips(), _clips(seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.update(_clips(), _clips(seed=5))
        out = ev.compute()
    assert out["num_clips"] == 4 and "fvd" not in out and np.isfinite(out["psnr"])


def test_psnr_ssim_do_not_depend_on_the_callers_autocast():
    """Stage modules compute their metrics inside bf16-mixed validation steps; SSIM's variance terms
    cancel catastrophically in bf16 (it read 0.75 for reconstructions whose float32 SSIM is 0.94)."""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 3, 32, 32, generator=g) * 0.2 + 0.4  # flat-ish frames, as Meta-World backgrounds
    fake = (real + 0.01 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    real, fake = real * 2 - 1, fake * 2 - 1
    ref = video_psnr_ssim(real, fake)
    ref_psnr_B, ref_ssim_B = psnr_ssim_per_sample(real, fake)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = video_psnr_ssim(real, fake)
        psnr_B, ssim_B = psnr_ssim_per_sample(real.bfloat16(), fake.bfloat16())
    assert torch.allclose(got["ssim"], ref["ssim"]) and torch.allclose(got["psnr"], ref["psnr"])
    assert torch.allclose(ssim_B, ref_ssim_B, atol=1e-3) and torch.allclose(psnr_B, ref_psnr_B, atol=0.1)


def test_per_sample_scores_are_the_clip_means_of_the_per_frame_ones_with_exact_frames_capped():
    """``psnr_ssim_per_sample`` (what the stage modules log per clip) is ``video_psnr_ssim`` averaged over each
    clip's frames; an exactly reproduced frame counts as ``PSNR_CAP_DB``, not infinity."""
    real = _clips(b=3)
    fake = real.clone()
    fake[0, 1:] += 10  # clip 0: frame 0 exact, the rest 10 grey levels off
    fake[1] = _clips(b=1, seed=7)[0]
    psnr_B, ssim_B = psnr_ssim_per_sample(real, fake)
    per_frame = video_psnr_ssim(real, fake)
    assert psnr_B.shape == ssim_B.shape == (3,) and psnr_B.dtype == ssim_B.dtype == torch.float32
    off = 10 * math.log10(1 / (10 / 255) ** 2)
    assert psnr_B[0].item() == pytest.approx((PSNR_CAP_DB + 4 * off) / 5, rel=1e-5)
    assert psnr_B[1].item() == pytest.approx(per_frame["psnr"][1].mean().item(), rel=1e-5)
    assert psnr_B[2].item() == PSNR_CAP_DB and ssim_B[2].item() == pytest.approx(1.0)
    assert torch.allclose(ssim_B.double(), per_frame["ssim"].mean(1))
