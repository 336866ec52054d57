"""Fine-tuning: a stage's own weights and buffers from a pretrained checkpoint of the same stage, weights only
(docs/contracts.md, "Fine-tuning"). Class, model facts, named data_spec keys and tensor shapes must match.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from whale_pl.lit.checkpoint import migrate_hparams, read_checkpoint
from whale_pl.lit.handoff import CLASS_KEY, FACTS_KEY, HandoffError, model_facts, qualified_name, values_equal


def _flat(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters with the ``net`` group opened into the top level."""
    return {**{k: v for k, v in hp.items() if k != "net"}, **(hp.get("net") or {})}


def _first(items: Sequence[str], sep: str = ", ", n: int = 4) -> str:
    """The first ``n`` of ``items`` (sorted), and how many more there are."""
    items = sorted(items)
    return sep.join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _differ(label: str, theirs: Mapping[str, Any], ours: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """'<label><name> <theirs> in the checkpoint != <ours> here' for each name both have with other values."""
    return [f"{label}{n} {theirs[n]!r} in the checkpoint != {ours[n]!r} here" for n in names
            if n in theirs and n in ours and not values_equal(theirs[n], ours[n])]


def check_init_compatible(module: nn.Module, ckpt: Mapping[str, Any], where: str,
                          data_spec_keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for ``module``'s own (non-frozen) ones, or ``HandoffError`` listing every mismatch."""
    want, got = qualified_name(type(module)), ckpt.get(CLASS_KEY)
    if got is not None and got != want:
        raise HandoffError(f"{where} holds a {got}, not a {want}: init_from needs a checkpoint of the same stage")
    hp_ckpt = _flat(migrate_hparams(type(module), ckpt.get("hyper_parameters") or {}, where))
    hp_here, facts = _flat(getattr(module, "hparams", {})), model_facts(module)
    problems = _differ("", ckpt.get(FACTS_KEY) or {}, facts, facts)
    problems += _differ("data_spec ", hp_ckpt.get("data_spec") or {}, hp_here.get("data_spec") or {}, data_spec_keys)
    skip = tuple(f"{name}." for name in getattr(module, "FROZEN", ()))  # the frozen earlier stages
    theirs = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(skip)}
    mine = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = mine.keys() - theirs.keys(), theirs.keys() - mine.keys()
    shapes = _differ("", {k: list(v.shape) for k, v in theirs.items()}, {k: list(v.shape) for k, v in mine.items()},
                     sorted(mine.keys() & theirs.keys()))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the checkpoint not in this model: {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_first(shapes, '; ')}")
    if missing or unexpected or shapes:  # named with the model's constructor arguments that differ
        model = getattr(module, "model", None)
        names = inspect.signature(type(model).__init__).parameters if model is not None else ()
        problems = _differ("hyper-parameter ", hp_ckpt, hp_here, names) + problems
    if problems:
        raise HandoffError(f"{where} does not fit this {type(module).__name__}: " + "; ".join(problems))
    return theirs


def init_from_checkpoint(module: nn.Module, path: str | Path, data_spec_keys: Sequence[str] = ()) -> int:
    """Copy a checkpoint's tensors into ``module``'s own ones in place; returns how many were copied."""
    where = f"init_from checkpoint {str(Path(path))!r}"
    tensors = check_init_compatible(module, read_checkpoint(path, where), where, data_spec_keys)
    module.load_state_dict(tensors, strict=False)  # the check above made the keys match this module's own
    return len(tensors)
