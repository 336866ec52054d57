"""AdamW with linear warm-up and cosine decay, shared by every stage's LightningModule (docs/method.md,
"Stage contracts")."""

from __future__ import annotations

import math
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
                         time_progress: Callable[[], float] | None = None) -> Callable[[int], float]:
    """lr multiplier: linear warm-up, then cosine to ``min_lr_ratio`` over steps (or ``time_progress()``, if ahead)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def _lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if time_progress is not None:
            progress = max(progress, min(1.0, max(0.0, time_progress())))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _lambda


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (ndim >= 2) and non-decayed groups."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def adamw_warmup_cosine(module: L.LightningModule, lr: float, weight_decay: float = 0.05, warmup_steps: int = 100,
                        min_lr_ratio: float = 0.1, anneal_by_time: bool = False) -> dict:
    """A ``configure_optimizers`` dict (betas 0.9, 0.95) over the Trainer's ``estimated_stepping_batches``."""
    total_steps = module.trainer.estimated_stepping_batches
    if not math.isfinite(total_steps):
        raise ValueError("set trainer.max_steps or max_epochs for the lr schedule")
    opt = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=(0.9, 0.95))
    time_progress = None
    if anneal_by_time:  # the share of the Trainer's max_time used so far (its Timer callback; survives a resume)
        timer = next((c for c in module.trainer.callbacks if isinstance(c, Timer)), None)
        duration = getattr(timer, "_duration", None)
        time_progress = (lambda: timer.time_elapsed("train") / duration) if duration else None
    sched = LambdaLR(opt, warmup_cosine_lambda(warmup_steps, int(total_steps), min_lr_ratio, time_progress))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
