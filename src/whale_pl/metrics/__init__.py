"""Video metrics: PSNR/SSIM (torchmetrics), FVD with a local Inception-I3D (no network)."""

from whale_pl.metrics.fvd import FVD, FVDSkippedWarning, frechet_distance, gaussian_stats, i3d_input, make_fvd
from whale_pl.metrics.i3d import I3DWeightsError, InceptionI3d, load_i3d
from whale_pl.metrics.video import VideoEvaluator, psnr_ssim_per_sample, video_psnr_ssim

__all__ = [
    "FVD", "FVDSkippedWarning", "I3DWeightsError", "InceptionI3d", "VideoEvaluator", "frechet_distance",
    "gaussian_stats", "i3d_input", "load_i3d", "make_fvd", "psnr_ssim_per_sample", "video_psnr_ssim",
]
