"""Reading stage checkpoints as tensors and plain data only (never unpickled objects, so a file cannot run
code), with older hyper-parameters mapped onto today's arguments.
"""

from __future__ import annotations

import inspect
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

from whale_pl.lit.handoff import CLASS_KEY, HandoffError, own_hparams, qualified_name, values_equal

M = TypeVar("M", bound=nn.Module)
CLI_KEYS = ("_class_path", "_instantiator")  # what LightningCLI adds to the hyper-parameters


def read_checkpoint(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """The checkpoint at ``path`` as tensors and plain data, or ``HandoffError`` naming the file."""
    path = Path(path)
    where = where or f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise HandoffError(f"{where} does not exist (train that stage first, or fix the path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HandoffError(f"{where} holds Python objects other than tensors and plain data; whale_pl does not "
                           f"unpickle them, since unpickling can run code ({first})") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise HandoffError(f"{where} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise HandoffError(f"{where} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def migrate_hparams(cls: type, hparams: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A checkpoint's hyper-parameters as arguments of today's ``cls``: flat names moved into their group, ``RETIRED``
    ones dropped at the value the code still implements (else refused), ``IGNORED`` ones dropped."""
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    groups = getattr(cls, "GROUPS", {})
    ignored = set(getattr(cls, "IGNORED", ()))  # removed options that never changed the trained model
    owner = {f.name: g for g, dc in reversed(groups.items()) for f in fields(dc)}  # field -> first group with it
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for key, value in hparams.items():
        if key in CLI_KEYS or key in ignored:
            continue
        if key in groups and isinstance(value, Mapping):
            nested[key].update({k: v for k, v in value.items() if not _retired(cls, k, v, where)})
        elif _retired(cls, key, value, where):
            continue
        elif key in params:
            out[key] = value
        elif key in owner:
            nested[owner[key]][key] = value
        else:
            raise HandoffError(f"{where}: hyper-parameter {key!r} is not an argument of {cls.__name__}")
    return out | {g: v for g, v in nested.items() if v}


def _retired(cls: type, key: str, value: Any, where: str) -> bool:
    """Whether ``key`` is a retired option of ``cls`` (at its one implemented value; any other is refused)."""
    retired = getattr(cls, "RETIRED", {})
    if key not in retired:
        return False
    if not values_equal(value, retired[key]):
        raise HandoffError(f"{where} was trained with {key}={value!r}, an option {cls.__name__} no longer has (the "
                           f"code implements {retired[key]!r} only); load it with commit cf14e40 or an earlier one")
    return True


def load_module(path: str | Path, cls: type[M], where: str | None = None, map_location: str | torch.device = "cpu",
                ckpt: Mapping[str, Any] | None = None, **overrides: Any) -> M:
    """A ``cls`` module rebuilt from the checkpoint at ``path`` (or its read ``ckpt``), ``overrides`` on top."""
    where = where or f"stage checkpoint {str(path)!r}"
    ckpt = read_checkpoint(path, where) if ckpt is None else ckpt
    want, got = qualified_name(cls), ckpt.get(CLASS_KEY)
    if got is not None and got != want:
        raise HandoffError(f"{where} holds a {got}, expected a {want}")
    hp = migrate_hparams(cls, ckpt.get("hyper_parameters") or {}, where) | overrides
    try:
        with own_hparams():
            module = cls(**hp)
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except HandoffError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise HandoffError(f"{where} does not load into {want} (class stamp: {got or 'none'}): "
                           f"{type(e).__name__}: {e}") from None
    return module.to(map_location)
