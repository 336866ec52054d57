"""Stage hand-off: load an earlier stage's checkpoint, check it, and freeze it for good.

Stage N holds stage N-1 as a submodule. It must stay bit-identical for the whole of stage N's
training (weights and buffers, the codebook and its EMA statistics included), so the loaded module
is frozen (``requires_grad=False``) and *pinned* in eval mode: a later ``.train()`` call — Lightning
calls it on the whole model at the start of fit and after each validation — leaves it in eval, so
no dropout, no EMA codebook update, no dead-code restart can run inside it.

Checkpoints name their class (``stamp_class`` in ``on_save_checkpoint``) and carry the
``data_spec`` of the data they were trained on; ``load_frozen`` checks both and any expected
attribute values (codebook size, ...), and every error names the path and the mismatch.
"""

from __future__ import annotations

import contextlib
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
# (those of them the current data_spec has)
SPEC_KEYS = ("frame_size", "action_dim", "action_space", "action_mean", "action_std", "state_dim")
M = TypeVar("M", bound=nn.Module)


class HandoffError(RuntimeError):
    """A stage checkpoint cannot be handed to the next stage (missing, wrong class, mismatched).

    The newest one raised is kept (``HandoffError.last``), so that a command line that reports errors
    through another library's output can still print the project's own message last (``cli.py``)."""

    last: "HandoffError | None" = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        HandoffError.last = self


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def model_facts(module: nn.Module) -> dict[str, Any]:
    """The shape-defining attributes of ``module.model`` (codebook size, action dim, ...) that it has."""
    model = getattr(module, "model", None)
    facts: dict[str, Any] = {}
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
    """Record the module's class (and its model facts, for ``init_from`` checks) in a checkpoint
    dict; call from ``on_save_checkpoint``."""
    checkpoint[CLASS_KEY] = qualified_name(type(module))
    checkpoint[FACTS_KEY] = model_facts(module)


class _PinnedTrain:
    """Replacement for ``nn.Module.train`` on a frozen module: always eval, whatever is asked.
    A small picklable callable (a bound method would not survive ``ddp_spawn`` pickling)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze_(module: M) -> M:
    """Freeze ``module`` in place: no gradients, eval mode, and pinned there (``.train()`` is a
    no-op on it and on all its submodules). Returns the module."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        # instance attribute shadows nn.Module.train; the parent's train() recursion calls it
        object.__setattr__(m, "train", _PinnedTrain(m))
        m.training = False
    module.whale_frozen = True  # type: ignore[attr-defined]
    return module


def is_frozen(module: nn.Module) -> bool:
    return bool(getattr(module, "whale_frozen", False))


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


def check_data_spec(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    where: str,
    keys: Sequence[str] | None = None,
) -> None:
    """Raise ``HandoffError`` naming every key whose value differs between the ``data_spec`` a
    checkpoint was trained with and the current one. ``keys=None`` compares all keys of
    ``current``; a key missing from the stored spec is a mismatch too."""
    if stored is None:
        raise HandoffError(f"{where}: checkpoint has no data_spec in its hyper-parameters")
    wanted = list(current.keys()) if keys is None else list(keys)
    bad = []
    for k in wanted:
        if k not in current:
            raise HandoffError(f"{where}: current data_spec has no key {k!r} to compare")
        if k not in stored:
            bad.append(f"{k}: missing in checkpoint, current {current[k]!r}")
        elif not values_equal(stored[k], current[k]):
            bad.append(f"{k}: checkpoint {stored[k]!r} != current {current[k]!r}")
    if bad:
        raise HandoffError(f"{where}: data_spec mismatch: " + "; ".join(bad))


def _lookup(module: nn.Module, name: str) -> Any:
    """An attribute of the module, of its ``model`` submodule, or a hyper-parameter."""
    for obj in (module, getattr(module, "model", None)):
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    hp = getattr(module, "hparams", {})
    if name in hp:
        return hp[name]
    raise HandoffError(f"has no attribute or hyper-parameter {name!r}")


@contextlib.contextmanager
def own_hparams() -> Iterator[None]:
    """Load a checkpoint with its *own* hyper-parameters. LightningCLI instantiates a stage module
    inside a context that makes every ``save_hyperparameters()`` call record the CLI's arguments;
    an earlier stage loaded in that module's ``__init__`` would otherwise get the later stage's
    hparams (and lose its data_spec)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def load_frozen(
    path: str | Path,
    expected_cls: type[M],
    data_spec: Mapping[str, Any] | None = None,
    data_spec_keys: Sequence[str] | None = None,
    expect: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> M:
    """Load a stage checkpoint written by ``expected_cls`` (a LightningModule) and return it frozen
    and pinned in eval mode.

    Checks, each failing with ``HandoffError`` naming ``path``: the file exists; the class stamped
    in it is ``expected_cls``; its state dict fits ``expected_cls`` exactly; its stored
    ``data_spec`` agrees with ``data_spec`` (all keys, or ``data_spec_keys``) when given; and each
    ``expect`` item (e.g. ``{"codebook_size": 1024}``) equals the loaded module's attribute /
    ``.model`` attribute / hyper-parameter of that name.
    """
    from whale_pl.lit.checkpoint import load_module, read_checkpoint

    where = f"stage checkpoint {str(path)!r}"
    ckpt = read_checkpoint(path, where)
    module = load_module(path, expected_cls, where=where, map_location=map_location, ckpt=ckpt)
    if data_spec is not None:
        check_data_spec(ckpt.get("hyper_parameters", {}).get("data_spec"), data_spec, where, data_spec_keys)
    for name, value in (expect or {}).items():
        try:
            have = _lookup(module, name)
        except HandoffError as e:
            raise HandoffError(f"{where}: {e}") from None
        if not values_equal(have, value):
            raise HandoffError(f"{where}: {name} is {have!r}, expected {value!r}")
    return freeze_(module)
