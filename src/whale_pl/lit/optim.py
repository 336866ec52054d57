"""AdamW with linear warm-up and cosine decay, shared by every stage's LightningModule.

Weight decay applies to matrices only (not to biases, norms, position embeddings or codebooks),
and only parameters that train (``requires_grad``) are handed to the optimiser, so a frozen earlier
stage held as a submodule is never touched. The schedule steps every optimiser step.

With ``anneal_by_time`` the cosine follows whichever budget runs out first, steps or the Trainer's
``max_time``: a run cut off by its time budget still ends at the bottom of the schedule, instead of
at a high learning rate (its last checkpoint is then an annealed model). The learning rate then
depends on wall-clock speed, so such runs are not step-for-step reproducible.
"""

from __future__ import annotations

import math
from typing import Callable

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
                         time_progress: Callable[[], float] | None = None):
    """lr multiplier: 0 -> 1 linearly over ``warmup_steps``, then cosine down to ``min_lr_ratio``.
    ``time_progress()``: share of a time budget used, in [0, 1]; the cosine then follows the larger
    of the step and time progress (after warm-up)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if time_progress is not None:
            progress = max(progress, min(1.0, max(0.0, time_progress())))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (ndim >= 2) and non-decayed groups."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_warmup_cosine(
    module: L.LightningModule,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_steps: int = 100,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    anneal_by_time: bool = False,
) -> dict:
    """Return a ``configure_optimizers`` dict. ``total_steps=None`` takes the Trainer's
    ``estimated_stepping_batches`` (needs ``max_steps`` or ``max_epochs``). ``anneal_by_time``:
    also follow the Trainer's ``max_time`` (module docstring); no effect without one."""
    if total_steps is None:
        est = module.trainer.estimated_stepping_batches
        if not math.isfinite(est):
            raise ValueError("set trainer.max_steps or max_epochs, or the model's total_steps, for the lr schedule")
        total_steps = int(est)
    opt = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas))
    time_progress = trainer_time_progress(module.trainer) if anneal_by_time else None
    sched = LambdaLR(opt, warmup_cosine_lambda(warmup_steps, total_steps, min_lr_ratio, time_progress))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def trainer_time_progress(trainer: L.Trainer) -> Callable[[], float] | None:
    """Share of the Trainer's ``max_time`` used so far (its Timer callback; survives a resume), or
    None when the Trainer has no time budget."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    duration = getattr(timer, "_duration", None)
    if timer is None or not duration:
        return None
    return lambda: timer.time_elapsed("train") / duration
