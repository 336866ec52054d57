"""Stage hand-off: load an earlier stage's checkpoint, check it, and freeze it for good (pinned in eval mode, so
it stays bit-identical, EMA codebook included). Every error names the path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

CLASS_KEY = "whale_class"
FACTS_KEY = "whale_model_facts"
# attributes of a stage's trainable ``model`` that a checkpoint records (``model_facts``)
FACT_NAMES = ("frame_size", "patch_size", "codebook_size", "code_dim", "grid_hw", "action_dim", "z_dim",
              "behavior_dim", "state_dim")
# data_spec keys a checkpoint must share with the data a later stage or an evaluation runs it on
SPEC_KEYS = ("frame_size", "action_dim", "action_space", "action_mean", "action_std", "state_dim")
M = TypeVar("M", bound=nn.Module)


class HandoffError(RuntimeError):
    """A stage checkpoint cannot be handed on (missing, wrong class, mismatched); ``last``: the newest raised."""

    last: "HandoffError | None" = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        HandoffError.last = self


def qualified_name(cls: type) -> str:
    """``module.QualifiedName`` of a class, as stamped into checkpoints."""
    return f"{cls.__module__}.{cls.__qualname__}"


def model_facts(module: nn.Module) -> dict[str, Any]:
    """The shape-defining attributes of ``module.model`` (codebook size, action dim, ...) that it has."""
    model, facts = getattr(module, "model", None), {}
    for name in FACT_NAMES:
        v = getattr(model, name, None)
        if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
            facts[name] = list(v) if isinstance(v, (tuple, list)) else int(v)
    return facts


def fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes of weights and buffers)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stamp_class(checkpoint: dict, module: nn.Module) -> None:
    """Record the module's class and model facts (for ``init_from`` checks) in a checkpoint dict."""
    checkpoint[CLASS_KEY] = qualified_name(type(module))
    checkpoint[FACTS_KEY] = model_facts(module)


def _pinned_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """``nn.Module.train`` of a frozen module: always eval (a module-level function, so ``ddp_spawn`` pickles it)."""
    return nn.Module.train(module, False)


def freeze_(module: M) -> M:
    """Freeze ``module`` in place (no gradients, eval mode, ``.train()`` pinned to eval) and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():  # the instance attribute shadows nn.Module.train; the parent's train() calls it
        object.__setattr__(m, "train", functools.partial(_pinned_train, m))
        m.training = False
    return module


def values_equal(a: Any, b: Any) -> bool:
    """Equal as plain data (floats to 1e-5 relative, sequences and mappings item by item)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7)
        except (TypeError, ValueError):
            return False
    return a == b


def check_data_spec(stored: Mapping[str, Any] | None, current: Mapping[str, Any], where: str,
                    keys: Sequence[str] | None = None) -> None:
    """Raise ``HandoffError`` naming every key (``keys``, or all of ``current``) the stored spec lacks or differs on."""
    if stored is None:
        raise HandoffError(f"{where}: checkpoint has no data_spec in its hyper-parameters")
    bad = [f"{k}: missing in checkpoint, current {current[k]!r}" if k not in stored else
           f"{k}: checkpoint {stored[k]!r} != current {current[k]!r}"
           for k in (current if keys is None else keys) if k not in stored or not values_equal(stored[k], current[k])]
    if bad:
        raise HandoffError(f"{where}: data_spec mismatch: " + "; ".join(bad))


@contextlib.contextmanager
def own_hparams() -> Iterator[None]:
    """Load with a checkpoint's own hyper-parameters, not the LightningCLI arguments of the stage loading it."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def load_frozen(path: str | Path, expected_cls: type[M], data_spec: Mapping[str, Any] | None = None,
                data_spec_keys: Sequence[str] | None = None) -> M:
    """An ``expected_cls`` checkpoint, frozen, whose ``data_spec`` agrees on ``data_spec_keys`` (else HandoffError)."""
    from whale_pl.lit.checkpoint import load_module, read_checkpoint

    where = f"stage checkpoint {str(path)!r}"
    ckpt = read_checkpoint(path, where)
    module = load_module(path, expected_cls, where=where, ckpt=ckpt)
    if data_spec is not None:
        check_data_spec(ckpt.get("hyper_parameters", {}).get("data_spec"), data_spec, where, data_spec_keys)
    return freeze_(module)
