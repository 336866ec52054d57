"""Stage 2 LightningModule: trains the behavior-conditioning VAE (``models/behavior.py``) on the frozen tokenizer's
code vectors; logs the action error, the KL, a linear probe and a PCA picture of the prior's z by family.
The checkpoint holds the tokenizer's path and fingerprint, not its weights (docs/contracts.md, "Stage 2").
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from whale_pl.analysis.probe import pca_2d, probe_accuracy, scatter_figure
from whale_pl.data.tokens import encode_frames
from whale_pl.lit.base import OPTIM_RETIRED, Optim, StageModule
from whale_pl.lit.handoff import HandoffError
from whale_pl.lit.tokenizer_module import TokenizerModule
from whale_pl.models.behavior import BehaviorModel, BehaviorNet

RETIRED = {  # options of earlier versions, with the value that left the model as it is now (cf14e40)
    "action_deltas": False, "action_likelihood": "gaussian", "mixture_k": 4, "decoder_state": False,
    "encoder_frames": True, "encoder": "transformer", "window": 4, "window_shared": False, "encoder_stats": False,
    "decoder_z": "input", "modulate_outliers": True, "prior_decode": 0.0, "marginal_decode": 0.0,
    "change_decode": 0.0, "change_decode_prior": 0.0, "change_edges": None, "change_levels": False,
    "probe_max_points": 4000, "free_bits": 0.0, "mlp_ratio": 4.0,
    **OPTIM_RETIRED,  # options no config set (the code of the others: cf14e40)
}
PROBE_MAX_POINTS = 4000  # prior z_t points in the PCA picture


class BehaviorModule(StageModule):
    """Stage 2 training / validation around ``BehaviorModel``."""

    GROUPS = {"net": BehaviorNet, "optim": Optim}
    RETIRED = RETIRED
    IGNORED = ("code_cache",)  # a speed switch of earlier versions (token shards replace it); the model is the same
    FROZEN = ("tokenizer",)
    INIT_FROM_SPEC_KEYS = ("action_space",)  # a pretrained model must share the action space

    def __init__(self, tokenizer_ckpt: str, net: BehaviorNet = BehaviorNet(), beta: float = 0.1,
                 kl_warmup_steps: int = 0, kl_balance: float | None = None,
                 optim: Optim = Optim(lr=1e-3, weight_decay=0.01, warmup_steps=50), probe_t_min: int = 8,
                 expect_codebook_size: int | None = None, data_spec: dict | None = None,
                 tokenizer_sha256: str | None = None, init_from: str | None = None) -> None:
        """Load the frozen tokenizer and build the VAE on its code size (arguments: docs/contracts.md, "Stage 2")."""
        super().__init__()
        self.save_hyperparameters()
        groups = self.init_groups(net=net, optim=optim)
        self.tokenizer = self.load_earlier("tokenizer", tokenizer_ckpt, TokenizerModule, data_spec)
        if expect_codebook_size is not None and self.tokenizer.model.codebook_size != expect_codebook_size:
            raise HandoffError(f"stage checkpoint {str(tokenizer_ckpt)!r}: codebook_size is "
                               f"{self.tokenizer.model.codebook_size}, expected {expect_codebook_size}")
        if data_spec is None:  # inherit the data the tokenizer was trained on; checked against the datamodule
            data_spec = self.hparams["data_spec"] = dict(self.tokenizer.hparams["data_spec"])
        tok = self.tokenizer.model
        h, w = tok.grid_hw(tuple(data_spec["frame_size"]))
        self.model = BehaviorModel(code_dim=tok.code_dim, action_dim=int(data_spec["action_dim"]), grid_tokens=h * w,
                                   **asdict(groups["net"]))
        self.families: list[str] = list(data_spec.get("families") or [])
        self._val_z: list[torch.Tensor] = []
        self._val_family: list[torch.Tensor] = []

    def setup(self, stage: str) -> None:
        """The base's checks; the families come from the data when the checkpoint has none."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.families and getattr(dm, "data_spec", None) is not None:
            self.families = list(dm.data_spec.get("families") or [])

    @torch.no_grad()
    def batch_codes(self, batch: dict) -> torch.Tensor:
        """Code vectors of a batch's clips: of its ``ids`` (token shards), else of its frames tokenised now."""
        ids_BThw = batch["ids"] if "ids" in batch else encode_frames(self.tokenizer.model, batch["frames"])
        return self.tokenizer.model.embed(ids_BThw).float()

    def current_beta(self) -> float:
        """The KL weight at this step: ``beta``, ramped linearly from 0 over ``kl_warmup_steps``."""
        warm = self.hparams.kl_warmup_steps or 0
        return float(self.hparams.beta) * (min(1.0, self.global_step / warm) if warm > 0 else 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One stage-2 step on a batch of clips (posterior z sampled)."""
        beta = self.current_beta()
        out = self.model.loss(self.batch_codes(batch), batch["actions"], beta=beta, sample=True,
                              kl_balance=self.hparams.kl_balance)
        B = batch["actions"].shape[0]
        self.log_dict({"train/loss": out.loss, "train/action_nll": out.nll, "train/kl": out.kl,
                       "train/action_mse": out.action_mse, "train/beta": beta}, prog_bar=False, batch_size=B)
        self.log("loss", out.loss, prog_bar=True, logger=False, batch_size=B)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Validation loss with the posterior mean; keeps the prior's z_t (t >= probe_t_min) for the probe."""
        out = self.model.loss(self.batch_codes(batch), batch["actions"], beta=float(self.hparams.beta), sample=False,
                              kl_balance=self.hparams.kl_balance)
        B = batch["actions"].shape[0]
        self.log_dict({"val/loss": out.loss, "val/action_nll": out.nll, "val/kl": out.kl,
                       "val/action_mse": out.action_mse, "val/action_mse_prior": out.action_mse_prior},
                      prog_bar=False, batch_size=B, sync_dist=True)
        self.log("val_loss", out.loss, prog_bar=True, logger=False, batch_size=B, sync_dist=True)
        t0 = int(self.hparams.probe_t_min)
        if "family" in batch and out.prior_mu_BTZ.shape[1] > t0:
            self._val_z.append(out.prior_mu_BTZ[:, t0:].detach().float().cpu())  # [B, T - t0, Z]
            self._val_family.append(batch["family"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        """Log the in-training family probe on the kept z_t and their PCA picture coloured by family."""
        if not self._val_z:
            return
        z_BTZ, fam_B = torch.cat(self._val_z), torch.cat(self._val_family)
        self._val_z, self._val_family = [], []
        if self.trainer.sanity_checking:
            return
        if self.trainer.world_size > 1:  # probe and picture over every rank's clips (in rank order), not rank 0's
            z_BTZ = torch.cat(gather_all_tensors(z_BTZ.to(self.device))).cpu()
            fam_B = torch.cat(gather_all_tensors(fam_B.to(self.device))).cpu()
        n_classes = max(len(self.families), 1 + int(fam_B.max()))
        # a quick in-training probe on z_t (t >= probe_t_min): fit on even-indexed validation clips,
        # score the odd-indexed ones (benchmarks/behavior_probe.py: train episodes -> held-out episodes)
        if len(fam_B) >= 8 and len(fam_B.unique()) >= 2:
            tr, te = z_BTZ[0::2], z_BTZ[1::2]
            acc = probe_accuracy(tr.flatten(0, 1), fam_B[0::2].repeat_interleave(tr.shape[1]),
                                 te.flatten(0, 1), fam_B[1::2].repeat_interleave(te.shape[1]), n_classes=n_classes)
            self.log("val/probe_acc_clips", acc, sync_dist=True)  # the same value on every rank
        exp = getattr(self.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_figure") and self.global_rank == 0 and len(fam_B) >= 3:
            z_NZ = z_BTZ.flatten(0, 1)
            fam_N = fam_B.repeat_interleave(z_BTZ.shape[1])
            keep = torch.randperm(len(fam_N), generator=torch.Generator().manual_seed(0))[:PROBE_MAX_POINTS]
            fig = scatter_figure(pca_2d(z_NZ[keep]), fam_N[keep].numpy(), self.families or None,
                                 f"prior z_t (t >= {self.hparams.probe_t_min}), step {self.global_step}")
            exp.add_figure("val/z_pca_by_family", fig, self.global_step)

