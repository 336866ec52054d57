"""Stage 3 LightningModule: trains the ST-MaskGIT dynamics (``models/dynamics.py``) on the frozen tokenizer's ids,
conditioned on actions and the frozen behavior prior's z_t, and validates it against the copy baseline and by
rollout PSNR / SSIM (docs/method.md, "Validation"; docs/contracts.md, "Stage 3").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torchmetrics import MeanMetric

from whale_pl.data.frames import frames_to_unit
from whale_pl.data.tokens import encode_frames
from whale_pl.lit.base import OPTIM_RETIRED, Optim, StageModule
from whale_pl.lit.handoff import HandoffError, values_equal
from whale_pl.lit.logging import log_image, paired_video_grid
from whale_pl.metrics.video import psnr_ssim_per_sample
from whale_pl.models.dynamics import DynamicsModel, DynamicsNet

# options of earlier versions, each with the only value the code still implements (the code of the others: cf14e40)
RETIRED = {"injection": "adanorm", "history": "masked", "full_mask_prob": 0.0, "change_input": False,
           "prev_frame_input": True, "copy_logit": True, "code_embed": True, "eval_horizon": None, "log_samples": 4,
           "dropout": 0.0, "max_steps": None, "mlp_ratio": 4.0, **OPTIM_RETIRED}
LOG_SAMPLES = 4  # clips in the TensorBoard picture of validation rollouts
CLOCK_KEYS = ("frame_stride", "action_space", "action_mean", "action_std")  # the behavior prior's inputs


@dataclass
class DynamicsLoss:
    """How training clips are masked and the heads weighted (``loss:`` group)."""

    context_frames: int = 1  # clean frames at the start of each training clip and of rollouts
    max_context_frames: int | None = None  # None, or each clip draws its context from [context_frames, this]
    corrupt_prob: float = 0.1  # max share of visible future tokens replaced by random ids
    reward_weight: float = 0.1
    success_weight: float = 0.1
    state_weight: float = 0.1


@dataclass
class Sampling:
    """Generation in validation rollouts and ``imagine`` (``sampling:`` group)."""

    maskgit_steps: int = 4
    temperature: float = 0.0  # 0: greedy
    rollout_horizon: int = 8  # frames of the validation rollouts (val/psnr_ar_*)
    rollout_batches: int = 2  # validation batches rolled out


class DynamicsModule(StageModule):
    """Stage 3 training / validation around ``DynamicsModel``; ``use_behavior=False`` is the ablation."""

    GROUPS = {"net": DynamicsNet, "loss": DynamicsLoss, "sampling": Sampling, "optim": Optim}
    RETIRED = RETIRED
    FROZEN = ("tokenizer", "behavior")
    INIT_FROM_SPEC_KEYS = ("action_space",)  # a pretrained model must share the action space
    supports_value_eval = True  # the evaluation callback's value hook (contracts.md, Evaluation)

    def __init__(self, tokenizer_ckpt: str, behavior_ckpt: str | None = None, use_behavior: bool = True,
                 net: DynamicsNet = DynamicsNet(), loss: DynamicsLoss = DynamicsLoss(), sampling: Sampling = Sampling(),
                 optim: Optim = Optim(lr=3e-4, warmup_steps=200), intra_op_threads: int | None = None,
                 data_spec: dict | None = None, tokenizer_sha256: str | None = None,
                 behavior_sha256: str | None = None, init_from: str | None = None) -> None:
        """Load the frozen earlier stages and build the model on their shapes (``intra_op_threads``: at setup)."""
        super().__init__()
        self.save_hyperparameters()
        groups = self.init_groups(net=net, loss=loss, sampling=sampling, optim=optim)
        self.loss_cfg, self.sampling = groups["loss"], groups["sampling"]
        self.tokenizer, self.behavior = self._load_earlier_stages(data_spec)
        tok, spec = self.tokenizer.model, self.hparams.data_spec
        self.model = DynamicsModel(tok.codebook_size, tok.grid_hw(), action_dim=int(spec["action_dim"]),
                                   behavior_dim=self.behavior.model.z_dim if self.behavior is not None else 0,
                                   state_dim=int(spec.get("state_dim") or 0), code_dim=tok.code_dim,
                                   **asdict(groups["net"]))
        self.model.set_code_vectors(tok.embed(torch.arange(tok.codebook_size)))
        self.val_psnr = torch.nn.ModuleDict({k: MeanMetric() for k in ("train_family", "ood", "all")})
        self.val_ssim = torch.nn.ModuleDict({k: MeanMetric() for k in ("train_family", "ood", "all")})

    def _load_earlier_stages(self, data_spec: dict | None):
        """The frozen tokenizer and behavior model (trained on this very tokenizer) from their paths."""
        from whale_pl.lit.behavior_module import BehaviorModule
        from whale_pl.lit.tokenizer_module import TokenizerModule

        hp = self.hparams
        tokenizer = self.load_earlier("tokenizer", hp.tokenizer_ckpt, TokenizerModule, data_spec)
        if data_spec is None:  # inherit the data the tokenizer was trained on; checked on fit
            data_spec = self.hparams["data_spec"] = dict(tokenizer.hparams["data_spec"])
        if not hp.use_behavior:
            return tokenizer, None
        if not hp.behavior_ckpt:
            raise ValueError("use_behavior=True needs behavior_ckpt (or set use_behavior: false for the ablation)")
        behavior = self.load_earlier("behavior", hp.behavior_ckpt, BehaviorModule, data_spec, own_weights=True)
        if behavior.hparams.get("tokenizer_sha256") != hp.tokenizer_sha256:
            raise HandoffError(
                f"stage checkpoint {str(hp.behavior_ckpt)!r} was trained on a different tokenizer than "
                f"{str(hp.tokenizer_ckpt)!r} (sha256 {str(behavior.hparams.get('tokenizer_sha256'))[:16]}... "
                f"!= {hp.tokenizer_sha256[:16]}...); point both paths at the same stage-1 run")
        return tokenizer, behavior

    def setup(self, stage: str) -> None:
        """Thread count, the base's checks, and at fit the behavior prior's clock."""
        if self.hparams.intra_op_threads:
            torch.set_num_threads(int(self.hparams.intra_op_threads))
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and getattr(dm, "data_spec", None) is not None:
            self.check_behavior_clock(dm.data_spec)

    def check_behavior_clock(self, spec: dict) -> None:
        """Refuse a behavior prior trained on another clock than ``spec``'s data, naming both values."""
        if self.behavior is None:
            return
        theirs = self.behavior.hparams.get("data_spec") or {}
        bad = [f"{k}: behavior {theirs.get(k)!r} != this data's {spec[k]!r}"
               for k in CLOCK_KEYS if k in spec and not values_equal(theirs.get(k), spec[k])]
        norm = lambda s: [[d["name"], d["action_mean"], d["action_std"]] for d in s.get("datasets") or []]  # noqa: E731
        if "datasets" in spec and not values_equal(norm(theirs), norm(spec)):
            bad.append(f"per-dataset normalisation: behavior {norm(theirs)!r} != this data's {norm(spec)!r}")
        if set(spec.get("retrace_strides") or []) - set(theirs.get("retrace_strides") or []):
            bad.append(f"retrace_strides: behavior trained on {theirs.get('retrace_strides')!r}, this fit asks its "
                       f"prior about {spec['retrace_strides']!r}")
        if bad:
            raise HandoffError(f"behavior checkpoint {str(self.hparams.behavior_ckpt)!r} was trained on another clock "
                               "than this dynamics fit: " + "; ".join(bad) + ". Train stage 2 on stage 3's data "
                               "section (frame_stride, retrace_strides, the same datasets)")

    @torch.no_grad()
    def tokenize(self, frames_BTCHW: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> token ids ``[B, T, h, w]``, each frame alone (as the token shards hold them)."""
        return encode_frames(self.tokenizer.model, frames_BTCHW)

    @torch.no_grad()
    def behavior_z(self, ids_BThw: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor | None:
        """z_t = prior mean of the frozen behavior model given history <= t (None when off)."""
        if self.behavior is None:
            return None
        codes = self.tokenizer.model.embed(ids_BThw)
        mu_BTZ, _ = self.behavior.model.prior(codes, actions_BTA)
        return mu_BTZ.float()

    def z_fn(self):
        """The prior as a callable for ``imagine`` / retracing (None when behavior is off)."""
        return None if self.behavior is None else self.behavior_z

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A batch as model inputs: token ids (its ``ids``, else its frames tokenised), actions, z, strides."""
        actions = batch["actions"].float()
        ids = batch["ids"].long() if "ids" in batch else self.tokenize(batch["frames"])
        return ids, actions, self.behavior_z(ids, actions), batch.get("stride")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The MaskGIT cross-entropy plus the weighted head losses; logs each part."""
        ids, actions, z, stride = self._inputs(batch)
        w = self.loss_cfg
        out = self.model.training_losses(ids, actions, z, batch["rewards"], batch["success"], batch.get("state"),
                                         stride, context_frames=w.context_frames, corrupt_prob=w.corrupt_prob,
                                         max_context_frames=w.max_context_frames)
        loss = out["ce"] + w.reward_weight * out["reward"] + w.success_weight * out["success"]
        if "state" in out:
            loss = loss + w.state_weight * out["state"]
        B = ids.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for k, v in out.items():
            self.log(f"train/{k}", v, batch_size=B, prog_bar=k == "acc")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Teacher-forced CE / accuracy against the copy baseline; on the first batches, rollout PSNR / SSIM."""
        ids, actions, z, stride = self._inputs(batch)
        B = ids.shape[0]
        logits = self.model.teacher_forced(ids, actions, z, stride).float()
        target = ids[:, 1:]
        ce = F.cross_entropy(rearrange(logits, "b t h w v -> (b t h w) v"), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        copy = (ids[:, :-1] == ids[:, 1:]).float().mean()
        self.log("val/ce", ce, batch_size=B, sync_dist=True)
        self.log("val/acc", acc, batch_size=B, prog_bar=True, sync_dist=True)
        self.log("val/copy_acc", copy, batch_size=B, sync_dist=True)
        self.log("val/acc_minus_copy", acc - copy, batch_size=B, sync_dist=True)
        if batch_idx < self.sampling.rollout_batches:
            out = self.rollout(batch, ids=ids, actions=actions, stride=stride)
            ood = batch["ood"].bool() if "ood" in batch else torch.zeros(B, dtype=torch.bool, device=ids.device)
            if "psnr_recon_B" in out:  # frame batches only: on token batches the real clip is the decoding
                self.log("val/psnr_tokenizer_recon", out["psnr_recon_B"].mean(), batch_size=B, sync_dist=True)
            self.log("val/psnr_still_context", out["psnr_still_B"].mean(), batch_size=B, sync_dist=True)
            # always update (weight 0 where a group is absent) so every DDP rank syncs the same metrics
            for name, sel in (("train_family", ~ood), ("ood", ood), ("all", torch.ones_like(ood))):
                self.val_psnr[name].update(out["psnr_B"].float(), sel.float())
                self.val_ssim[name].update(out["ssim_B"].float(), sel.float())
            if batch_idx == 0:
                log_image(self, "val/rollout_real_vs_imagined", paired_video_grid(
                    out["real_BTCHW"], out["imagined_BTCHW"], max_clips=LOG_SAMPLES, max_frames=None))

    def on_validation_epoch_end(self) -> None:
        """Log the rollout PSNR / SSIM of each episode group (training families, OOD, all)."""
        for name in ("train_family", "ood", "all"):
            for kind, metric in (("psnr", self.val_psnr[name]), ("ssim", self.val_ssim[name])):
                if metric.update_count > 0:
                    value = metric.compute()
                    if torch.isfinite(value):  # NaN: no clip of this group in the rollouts
                        self.log(f"val/{kind}_ar_{name}", value, sync_dist=False)
                metric.reset()

    @torch.no_grad()
    def rollout(self, batch: dict, horizon: int | None = None, ids: torch.Tensor | None = None,
                actions: torch.Tensor | None = None, stride: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Rollout of a batch's clips with the recorded actions, decoded, with PSNR / SSIM against the real clip
        (a token batch: its decoding) beside the reconstruction and still-frame references."""
        if ids is None:
            ids, actions, _, stride = self._inputs(batch)
        C = self.loss_cfg.context_frames
        H = min(horizon or self.sampling.rollout_horizon, ids.shape[1] - C)
        out = self.model.imagine(ids[:, :C], actions, self.z_fn(), horizon=H, steps=self.sampling.maskgit_steps,
                                 temperature=self.sampling.temperature, stride_B=stride)
        decode = self.tokenizer.model.decode
        imagined = decode(out["ids_BThw"]).float()
        recon = decode(ids[:, C : C + H]).float()  # the tokenizer's ceiling
        frames = batch.get("frames")
        real = recon if frames is None else frames_to_unit(frames[:, C : C + H])
        psnr_B, ssim_B = psnr_ssim_per_sample(real, imagined)
        res = {**out, "imagined_BTCHW": imagined, "real_BTCHW": real, "psnr_B": psnr_B, "ssim_B": ssim_B,
               "psnr_still_B": psnr_ssim_per_sample(real, self.copy_videos(batch, real))[0]}
        if frames is not None:
            res["psnr_recon_B"] = psnr_ssim_per_sample(real, recon)[0]
        return res

    @torch.no_grad()
    def eval_videos(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, imagined) clips after the context, float [B, T, 3, H, W]: the evaluation callback's protocol."""
        out = self.rollout(batch, horizon=batch["actions"].shape[1])
        return out["real_BTCHW"], out["imagined_BTCHW"]

    @torch.no_grad()
    def copy_videos(self, batch: dict, real_BTCHW: torch.Tensor) -> torch.Tensor:
        """The baseline of ``eval_videos``: the last real context frame (a token batch: decoded) held still."""
        C, frames = self.loss_cfg.context_frames, batch.get("frames")
        if frames is not None:
            last = frames_to_unit(frames[:, C - 1 : C])
        else:
            last = self.tokenizer.model.decode(batch["ids"].long()[:, C - 1 : C]).float()
        return last.expand_as(real_BTCHW)
