"""Video metrics: PSNR/SSIM (torchmetrics), FVD with a local Inception-I3D (no network)."""
