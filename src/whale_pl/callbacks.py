"""Evaluation callback: PSNR/SSIM, FVD and (dynamics) value gap on held-out clips every N validations.

The module implements ``eval_videos(batch) -> (real_BTCHW, generated_BTCHW)`` (docs/contracts.md). The
value hook runs in a fresh child process, so the simulator's GL contexts never exist in the trainer
process (forked DataLoader workers would hang on them). Results go to every logger (``eval/...``), to
TensorBoard as pictures, and as one JSON line per evaluation to ``<log_dir>/metrics.jsonl``.
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

DEFAULT_VALUE_FN = "whale_pl.rollout.value:value_metrics_for_checkpoint"
# the trainer's distributed environment must not leak into the value child (it is a lone process)
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def call_eval_videos(module: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`module.eval_videos(batch)` checked against the protocol; returns (real, generated)."""
    name = type(module).__name__
    if getattr(module, "eval_videos", None) is None:
        raise TypeError(f"{name} has no eval_videos(batch) -> (real_BTCHW, generated_BTCHW); "
                        "see docs/contracts.md (Evaluation)")
    with torch.no_grad():
        out = module.eval_videos(batch)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
        got = type(out).__name__ + (f" with keys {list(out)}" if isinstance(out, dict) else "")
        raise TypeError(f"{name}.eval_videos must return (real_BTCHW, generated_BTCHW) tensors, "
                        f"got {got}; see docs/contracts.md (Evaluation)")
    real, fake = out
    if real.shape != fake.shape or real.ndim != 5 or real.shape[2] != 3:
        raise ValueError(f"{name}.eval_videos: real {tuple(real.shape)} and generated "
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


def run_value_hook(spec: str, ckpt_path: str, kwargs: dict, timeout: float | None = None) -> dict[str, float]:
    """`spec(ckpt_path, **kwargs)` in a fresh interpreter (it never re-imports the trainer's `__main__`; DDP
    variables removed); its numeric results as floats."""
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
    """Video metrics on held-out clips every ``every_n_val_epochs`` validation epochs (sanity checks never
    count): ``num_clips`` clips, FVD when ``fvd`` (clips of >= 9 frames; skipped with one warning without
    I3D weights, or from ``i3d_path``, a TorchScript I3D), ``log_clips`` clips drawn to TensorBoard.
    ``value_gap``: None = on for modules with ``supports_value_eval`` when ``value_fn`` ('module:function',
    called as fn(ckpt_path, **value_kwargs) -> dict of floats) exists; True = required; False = off.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_clips: int = 16, fvd: bool = True, i3d_path: str | None = None,
                 fvd_batch_size: int = 8, log_clips: int = 4, value_gap: bool | None = None,
                 value_fn: str = DEFAULT_VALUE_FN, value_kwargs: dict | None = None,
                 metrics_file: str = "metrics.jsonl"):
        super().__init__()
        if every_n_val_epochs < 1 or num_clips < 1:
            raise ValueError(f"every_n_val_epochs ({every_n_val_epochs}) and num_clips ({num_clips}) must be >= 1")
        self.every_n_val_epochs, self.num_clips, self.fvd, self.i3d_path = every_n_val_epochs, num_clips, fvd, i3d_path
        self.fvd_batch_size, self.log_clips, self.value_gap, self.value_fn = fvd_batch_size, log_clips, value_gap, value_fn
        self.value_kwargs, self.metrics_file = dict(value_kwargs or {}), metrics_file
        self._val_epochs, self._active, self._seconds, self._fvd_loaded = 0, False, 0.0, False
        self._fvd: FVD | None = None
        self._evaluator: VideoEvaluator | None = None
        self._shown: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_metrics: dict | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decide whether this validation epoch is evaluated; on rank 0 set up the accumulators."""
        self._active = False
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        self._active = self._val_epochs % self.every_n_val_epochs == 0
        if self._active and trainer.is_global_zero:
            if self.fvd and not self._fvd_loaded:
                self._fvd, self._fvd_loaded = make_fvd(self.i3d_path, pl_module.device, self.fvd_batch_size), True
            if self._fvd is not None:
                self._fvd.reset()
            self._evaluator = VideoEvaluator(self._fvd if self.fvd else None)
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
        record = {"stage": type(pl_module).__name__, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "eval_seconds": round(self._seconds + time.perf_counter() - t0, 3),  # eval_videos + metrics
                  "value_seconds": round(t_value, 3),
                  **{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}}
        self.last_metrics = record
        self._log(trainer, metrics)
        append_jsonl(Path(log_dir) / self.metrics_file, record)
        self._evaluator.reset()

    def _value_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The value hook's figures, from a temporary checkpoint (every rank saves it: a collective call)."""
        if self.value_gap is False:
            return {}
        supported = bool(getattr(pl_module, "supports_value_eval", False))
        available = value_fn_available(self.value_fn)
        if self.value_gap is True and not (supported and available):
            raise RuntimeError(f"EvalCallback(value_gap=True): {type(pl_module).__name__} supports_value_eval="
                               f"{supported}, {self.value_fn} available={available}")
        if not (supported and available):
            return {}
        ckpt = Path(trainer.default_root_dir) / ".eval_tmp" / f"value-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(str(ckpt))
        try:
            return run_value_hook(self.value_fn, str(ckpt), self.value_kwargs) if trainer.is_global_zero else {}
        finally:
            if trainer.is_global_zero:
                ckpt.unlink(missing_ok=True)

    def _log(self, trainer: L.Trainer, metrics: dict) -> None:
        """Scalars to every logger; to TensorBoard also the clips and the per-frame curves."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "psnr_capped"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if not isinstance(logger, TensorBoardLogger):
                continue
            if self._shown is not None:
                grid = paired_video_grid(*self._shown, max_clips=self.log_clips, max_frames=None)
                logger.experiment.add_image("eval/real_vs_generated", grid, trainer.global_step)
            fig = Figure(figsize=(8, 3))
            a, b = fig.subplots(1, 2)
            a.plot(metrics["psnr_per_frame"], marker="o")
            a.set(xlabel="frame", ylabel="PSNR (dB)", title="PSNR per frame")
            b.plot(metrics["ssim_per_frame"], marker="o", color="tab:orange")
            b.set(xlabel="frame", ylabel="SSIM", title="SSIM per frame")
            fig.tight_layout()
            logger.experiment.add_figure("eval/per_frame", fig, trainer.global_step)
