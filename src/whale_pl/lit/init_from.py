"""Fine-tuning: start a stage's own weights from a pretrained checkpoint of the same stage.

Every stage module takes ``init_from: <ckpt>``. At the start of a fit (``setup("fit")``) the
module's *own* weights and buffers (``model.*``: the codebook and its EMA statistics included) are
copied from that checkpoint. Weights only: the optimiser, the lr schedule, the step counter and the
callbacks start fresh — this is not a resume (that is ``--ckpt_path``, which, when given as well,
restores its own weights after this and wins). Frozen earlier stages are *not* taken from the
checkpoint: they come from the paths the config names (the hand-off), so a fine-tuned behavior or
dynamics model runs on the fine-tuned earlier stages.

Checks, each failing with ``InitFromError`` naming the path: the file exists and is a Lightning
checkpoint; it was written by the same class; the model facts stamped in it (codebook size, action
dim, frame size, ... — ``handoff.model_facts``) equal this module's; the ``data_spec`` keys the
caller names agree; and its state dict fits this module's own tensors exactly (names and shapes;
the model constructor's hyper-parameters that differ are named to explain a misfit). Settings that
leave the shapes alone (dropout, EMA decay, loss weights) may differ from pretraining.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from whale_pl.lit.handoff import (CLASS_KEY, FACTS_KEY, HandoffError, _values_equal, check_retired, is_frozen,
                                  model_facts, qualified_name)


class InitFromError(HandoffError):
    """A pretrained checkpoint cannot initialise this module (missing, other class, other shapes)."""


def frozen_prefixes(module: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the frozen earlier stages held as submodules (``tokenizer.``, ...)."""
    return tuple(f"{name}." for name, child in module.named_children() if is_frozen(child))


def own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict without its frozen earlier stages."""
    skip = frozen_prefixes(module)
    return {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}


def _architecture_names(module: nn.Module) -> list[str]:
    """Hyper-parameters the trainable model's constructor takes (dim, depth, codebook_size, ...)."""
    model = getattr(module, "model", None)
    if model is None:
        return []
    return [n for n in inspect.signature(type(model).__init__).parameters if n != "self"]


def _fmt_keys(keys: Sequence[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_init_compatible(
    module: nn.Module,
    ckpt: Mapping[str, Any],
    where: str,
    data_spec_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Return the checkpoint tensors to load into ``module`` (its own, non-frozen ones), or raise
    ``InitFromError`` listing every mismatch."""
    want = qualified_name(type(module))
    got = ckpt.get(CLASS_KEY)
    if got is not None and got != want:
        raise InitFromError(f"{where} holds a {got}, not a {want}: init_from needs a checkpoint of the same stage")
    check_retired(ckpt.get("hyper_parameters") or {}, getattr(module, "retired_options", {}), where)
    problems: list[str] = []
    stored_facts = ckpt.get(FACTS_KEY) or {}
    for name, have in model_facts(module).items():
        if name in stored_facts and not _values_equal(stored_facts[name], have):
            problems.append(f"{name} {stored_facts[name]!r} in the checkpoint != {have!r} here")
    hp_ckpt = ckpt.get("hyper_parameters", {}) or {}
    hp_here = getattr(module, "hparams", {})
    spec_ckpt, spec_here = hp_ckpt.get("data_spec") or {}, (hp_here.get("data_spec") or {})
    for k in data_spec_keys:
        if k in spec_ckpt and k in spec_here and not _values_equal(spec_ckpt[k], spec_here[k]):
            problems.append(f"data_spec {k} {spec_ckpt[k]!r} in the checkpoint != {spec_here[k]!r} here")
    skip = frozen_prefixes(module)
    theirs = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(skip)}
    mine = own_state(module)
    missing, unexpected = mine.keys() - theirs.keys(), theirs.keys() - mine.keys()
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the checkpoint not in this model: {_fmt_keys(unexpected)}")
    shapes = [f"{k} {list(theirs[k].shape)} in the checkpoint != {list(mine[k].shape)} here"
              for k in sorted(mine.keys() & theirs.keys()) if theirs[k].shape != mine[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:4])
                        + (f" (+{len(shapes) - 4} more)" if len(shapes) > 4 else ""))
    if missing or unexpected or shapes:  # explain with the constructor arguments that differ (others,
        # e.g. dropout or EMA decay, may change freely when fine-tuning)
        problems = [f"hyper-parameter {n} {hp_ckpt[n]!r} in the checkpoint != {hp_here[n]!r} here"
                    for n in _architecture_names(module)
                    if n in hp_ckpt and n in hp_here and not _values_equal(hp_ckpt[n], hp_here[n])] + problems
    if problems:
        raise InitFromError(f"{where} does not fit this {type(module).__name__}: " + "; ".join(problems))
    return theirs


def init_from_checkpoint(
    module: nn.Module,
    path: str | Path,
    data_spec_keys: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
) -> int:
    """Copy a pretrained checkpoint's weights and buffers into ``module``'s own (non-frozen)
    tensors in place (parameters keep their identity). Returns the number of tensors copied."""
    path = Path(path)
    where = f"init_from checkpoint {str(path)!r}"
    if not path.is_file():
        raise InitFromError(f"{where} does not exist (train the pretrained stage first, or fix the path)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise InitFromError(f"{where} cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InitFromError(f"{where} is not a Lightning checkpoint (no 'state_dict')")
    tensors = check_init_compatible(module, ckpt, where, data_spec_keys)
    result = module.load_state_dict(tensors, strict=False)
    skip = frozen_prefixes(module)
    left = [k for k in result.missing_keys if not k.startswith(skip)]
    if left or result.unexpected_keys:  # cannot happen after the check; guard against a silent partial load
        raise InitFromError(f"{where}: partial load (missing {left[:4]}, unexpected {result.unexpected_keys[:4]})")
    return len(tensors)


def maybe_init_from(module: nn.Module, stage: str, data_spec_keys: Sequence[str] = ()) -> None:
    """Call from a stage module's ``setup``: apply its ``init_from`` hyper-parameter when fitting."""
    path = getattr(module, "hparams", {}).get("init_from")
    if stage != "fit" or not path:
        return
    from lightning.pytorch.utilities import rank_zero_info

    n = init_from_checkpoint(module, path, data_spec_keys)
    rank_zero_info(f"[whale] {type(module).__name__}: {n} tensors initialised from {path} (weights only; "
                   "new optimiser and schedule)")
