"""Evaluation callback: PSNR/SSIM, FVD and (dynamics) value gap every N validations (docs/contracts.md, Evaluation)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from whale_pl.io import write_bytes_atomic
from whale_pl.lit.logging import paired_video_grid
from whale_pl.metrics.fvd import make_fvd
from whale_pl.metrics.video import VideoEvaluator

LOG_CLIPS = 4  # clips drawn to TensorBoard
# the trainer's distributed environment must not leak into the value child (it is a lone process)
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def call_eval_videos(module: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`module.eval_videos(batch)` without gradients: (real, generated)."""
    with torch.no_grad():
        return module.eval_videos(batch)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the file is rewritten under a temporary name and renamed (atomic)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        raise ValueError(f"{path}: last line is incomplete; refusing to append to a damaged metrics file")
    write_bytes_atomic(path, old + json.dumps(record, allow_nan=False, sort_keys=True).encode() + b"\n")


def run_value_hook(ckpt_path: str, kwargs: dict) -> dict[str, float]:
    """``rollout.value.value_metrics_for_checkpoint(ckpt_path, **kwargs)`` in a fresh interpreter, so the simulator's
    GL contexts never exist in the trainer (its forked DataLoader workers would hang on them)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "whale_pl.rollout.value", ckpt_path, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"value hook failed on {ckpt_path} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


class EvalCallback(Callback):
    """Video metrics of ``num_clips`` clips every ``every_n_val_epochs`` validations (+ value hook, for dynamics)."""

    def __init__(self, every_n_val_epochs: int = 1, num_clips: int = 16, value_kwargs: dict | None = None):
        super().__init__()
        if every_n_val_epochs < 1 or num_clips < 1:
            raise ValueError(f"every_n_val_epochs ({every_n_val_epochs}) and num_clips ({num_clips}) must be >= 1")
        self.every_n_val_epochs, self.num_clips = every_n_val_epochs, num_clips
        self.value_kwargs = dict(value_kwargs or {})
        self._val_epochs, self._active, self._seconds = 0, False, 0.0
        self._evaluator: VideoEvaluator | None = None
        self._shown: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decide whether this validation epoch is evaluated; on rank 0 set up the accumulators."""
        self._active = False
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        self._active = self._val_epochs % self.every_n_val_epochs == 0
        if self._active and trainer.is_global_zero:
            if self._evaluator is None:  # the I3D weights load once
                self._evaluator = VideoEvaluator(make_fvd(pl_module.device))
            self._evaluator.reset()
            self._shown, self._seconds = None, 0.0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score this batch's clips (rank 0) until ``num_clips`` are seen."""
        need = self.num_clips - self._evaluator.num_clips if self._active and trainer.is_global_zero else 0
        if need <= 0:
            return
        t0 = time.perf_counter()
        real, fake = (v[:need] for v in call_eval_videos(pl_module, batch))
        self._evaluator.update(real, fake)
        self._seconds += time.perf_counter() - t0
        if self._shown is None:
            self._shown = (real[:LOG_CLIPS].cpu(), fake[:LOG_CLIPS].cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute the figures (+ value gap), log them and append a line to the metrics file."""
        if not self._active:
            return
        self._active = False
        # both are collective under DDP (save_checkpoint barriers, log_dir broadcasts): every rank takes part
        t_value = time.perf_counter()
        value = self._value_metrics(trainer, pl_module)
        t_value = time.perf_counter() - t_value
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        if self._evaluator.num_clips == 0:
            rank_zero_warn("EvalCallback: no validation batches reached the callback; nothing evaluated")
            return
        t0 = time.perf_counter()
        metrics = self._evaluator.compute()
        metrics.update({f"value/{k}": v for k, v in value.items()})
        record = {"stage": type(pl_module).__name__, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "eval_seconds": round(self._seconds + time.perf_counter() - t0, 3),  # eval_videos + metrics
                  "value_seconds": round(t_value, 3),
                  **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}}
        self._log(trainer, metrics)
        append_jsonl(Path(log_dir) / "metrics.jsonl", record)
        self._evaluator.reset()

    def _value_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The value hook's figures, from a temporary checkpoint (every rank saves it: a collective call)."""
        if not getattr(pl_module, "supports_value_eval", False):
            return {}
        ckpt = Path(trainer.default_root_dir) / ".eval_tmp" / f"value-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(str(ckpt))
        try:
            return run_value_hook(str(ckpt), self.value_kwargs) if trainer.is_global_zero else {}
        finally:
            if trainer.is_global_zero:
                ckpt.unlink(missing_ok=True)

    def _log(self, trainer: L.Trainer, metrics: dict) -> None:
        """Scalars to every logger; to TensorBoard also the clips and the per-frame curves."""
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "psnr_capped"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if not isinstance(logger, TensorBoardLogger):
                continue
            grid = paired_video_grid(*self._shown, max_clips=LOG_CLIPS, max_frames=None)
            logger.experiment.add_image("eval/real_vs_generated", grid, trainer.global_step)
            fig = Figure(figsize=(8, 3))
            a, b = fig.subplots(1, 2)
            a.plot(metrics["psnr_per_frame"], marker="o")
            a.set(xlabel="frame", ylabel="PSNR (dB)", title="PSNR per frame")
            b.plot(metrics["ssim_per_frame"], marker="o", color="tab:orange")
            b.set(xlabel="frame", ylabel="SSIM", title="SSIM per frame")
            fig.tight_layout()
            logger.experiment.add_figure("eval/per_frame", fig, trainer.global_step)
