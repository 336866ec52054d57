"""Stage 1 LightningModule: trains the ``VideoTokenizer`` on MSE reconstruction + commitment loss."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from whale_pl.data.frames import frames_to_unit
from whale_pl.lit.base import OPTIM_RETIRED, Optim, StageModule
from whale_pl.lit.logging import log_image, paired_video_grid
from whale_pl.models.tokenizer import TokenizerNet, VideoTokenizer


def usage_and_perplexity(hist_K: torch.Tensor) -> tuple[float, float]:
    """Share of codes used at least once, and exp(entropy) of the code distribution."""
    p = hist_K.double() / hist_K.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return float((hist_K > 0).double().mean()), float(ent.exp())


class TokenizerModule(StageModule):
    """Trains stage 1: ``net`` is the ``VideoTokenizer``'s architecture, ``optim`` the optimiser's settings."""

    GROUPS = {"net": TokenizerNet, "optim": Optim}
    RETIRED = {"encoder_spatial_radius": None, "sticky_margin": 0.0, "l1_weight": 0.0,  # inert values (cf14e40)
               "in_channels": 3, "ema": True, "dropout": 0.0, "log_images_every_n_epochs": 1, "mlp_ratio": 4.0,
               **OPTIM_RETIRED}

    def __init__(self, net: TokenizerNet = TokenizerNet(), optim: Optim = Optim(lr=1e-3, warmup_steps=100),
                 data_spec: dict[str, Any] | None = None, init_from: str | None = None) -> None:
        """Build the tokenizer from ``net`` (``init_from``: a pretrained tokenizer checkpoint, ``lit/init_from.py``)."""
        super().__init__()
        self.save_hyperparameters()
        self.model = VideoTokenizer(**asdict(self.init_groups(net=net, optim=optim)["net"]))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self._hist: dict[str, torch.Tensor] = {}
        self._grid_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def check_data(self, spec: dict[str, Any], where: str) -> None:
        """The data's frame size must equal the tokenizer's (the one data_spec key it depends on)."""
        fs = spec["frame_size"]
        if tuple(int(s) for s in fs) != tuple(self.model.frame_size):
            raise ValueError(f"{where}: data frame_size {list(fs)} differs from the tokenizer's configured "
                             f"frame_size {list(self.model.frame_size)} (model.init_args.net.frame_size)")

    def _count(self, key: str, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=self.model.codebook_size).to(torch.long)
        self._hist[key] = self._hist[key] + counts if key in self._hist else counts

    def _log_usage(self, prefix: str) -> None:
        if (hist := self._hist.pop(prefix, None)) is None:
            return
        if self.trainer.world_size > 1:
            hist = self.trainer.strategy.reduce(hist.float(), reduce_op="sum")
        usage, ppl = usage_and_perplexity(hist)
        self.log(f"{prefix}/codebook_usage", usage, sync_dist=False)
        self.log(f"{prefix}/perplexity", ppl, sync_dist=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Reconstruction MSE + commitment loss of one batch; logs the parts and the PSNR."""
        x = frames_to_unit(batch["frames"], "batch['frames']")
        out = self.model(x)
        mse = F.mse_loss(out.recon_BTCHW.float(), x)
        loss = mse + out.commit_loss
        self._count("train", out.ids_BThw)
        psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))  # range 2 in [-1,1]
        self.log_dict({"train/loss": loss.detach(), "train/mse": mse.detach(), "train/commit": out.commit_loss.detach(),
                       "train/psnr": psnr, "train/restarted_codes": float(out.restarted)}, prog_bar=False)
        self.log("train/loss_step", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's codebook usage and perplexity."""
        self._log_usage("train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Reconstruct through ``encode`` -> ``decode``; accumulate PSNR/SSIM and code counts."""
        x = frames_to_unit(batch["frames"], "batch['frames']")
        ids = self.model.encode(x)
        recon = self.model.decode(ids).float()
        self._count("val", ids)
        a, b = ((recon + 1) / 2).flatten(0, 1), ((x + 1) / 2).flatten(0, 1)
        with torch.autocast(a.device.type, enabled=False):  # SSIM's variances cancel catastrophically in bf16
            self.val_psnr.update(a, b)
            self.val_ssim.update(a, b)
        self.log("val/mse", F.mse_loss(recon, x), sync_dist=True)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        self.log("val/ssim", self.val_ssim)
        if batch_idx == 0:
            self._grid_batch = (x[:4].detach(), recon[:4].detach())

    def on_validation_epoch_end(self) -> None:
        """Log codebook usage and originals above reconstructions."""
        self._log_usage("val")
        if self._grid_batch is not None and self.global_rank == 0:
            log_image(self, "val/originals_above_reconstructions", paired_video_grid(*self._grid_batch))
        self._grid_batch = None

    @torch.no_grad()
    def eval_videos(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(originals, reconstructions), float [B, T, 3, H, W] in [-1, 1]: the evaluation callback's protocol."""
        x = frames_to_unit(batch["frames"], "batch['frames']")
        return x, self.model.decode(self.model.encode(x)).float().clamp(-1, 1)
