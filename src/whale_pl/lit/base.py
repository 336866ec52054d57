"""What the three stage LightningModules share: argument groups (stored as plain dicts), the optimiser,
checkpoints without the frozen earlier stages (their sha256 is recorded), data checks (docs/contracts.md).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from whale_pl.data.tokens import check_token_tokenizer
from whale_pl.lit.checkpoint import load_module
from whale_pl.lit.handoff import (SPEC_KEYS, HandoffError, check_data_spec, fingerprint, freeze_, load_frozen,
                                  own_hparams, stamp_class)
from whale_pl.lit.init_from import init_from_checkpoint
from whale_pl.lit.optim import adamw_warmup_cosine

D = TypeVar("D")


@dataclass
class Optim:
    """AdamW with linear warm-up and cosine decay (``lit/optim.py``)."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    anneal_by_time: bool = False  # the cosine also follows the Trainer's max_time


OPTIM_RETIRED = {"betas": [0.9, 0.95], "total_steps": None}  # Optim fields no config set (removed after cf14e40)


def as_group(value: D | Mapping[str, Any] | None, cls: type[D], where: str, default: D | None = None) -> D:
    """An argument group as its dataclass, given as one or as a dict of the fields that differ from ``default``."""
    if is_dataclass(value):
        return value  # type: ignore[return-value]
    base = default if default is not None else cls()
    if value is None:
        return base
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(value).__name__}")
    names = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if unknown := sorted(set(value) - names):
        raise TypeError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(names)}")
    return replace(base, **value)


def plain(group: Any) -> dict[str, Any]:
    """A group as a plain dict (what a checkpoint stores)."""
    d = asdict(group) if is_dataclass(group) else dict(group)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class StageModule(L.LightningModule):
    """Base of the stage modules: groups, optimiser, checkpoint hooks and the data_spec contract."""

    GROUPS: ClassVar[dict[str, type]] = {"optim": Optim}
    RETIRED: ClassVar[dict[str, Any]] = {}  # removed option -> the default it had
    FROZEN: ClassVar[tuple[str, ...]] = ()  # attributes holding frozen earlier stages
    SPEC_KEYS: ClassVar[Sequence[str]] = SPEC_KEYS  # data_spec keys this stage must agree on
    INIT_FROM_SPEC_KEYS: ClassVar[Sequence[str]] = ()  # those an init_from checkpoint must share (fine-tuning)

    def init_groups(self, **groups: Any) -> dict[str, Any]:
        """Each group as its dataclass; also stores them in the hyper-parameters as plain dicts."""
        defaults = inspect.signature(type(self).__init__).parameters
        out = {}
        for name, value in groups.items():
            default = defaults[name].default if name in defaults else None
            out[name] = as_group(value, self.GROUPS[name], f"{type(self).__name__}.{name}",
                                 default if is_dataclass(default) else None)
            self.hparams[name] = plain(out[name])
        return out

    def configure_optimizers(self) -> dict:
        """AdamW with warm-up and cosine decay, from the ``optim`` group (init_groups stored every field)."""
        return adamw_warmup_cosine(self, **self.hparams["optim"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stamp the class; leave the frozen stages out (their paths and sha256 are hyper-parameters)."""
        stamp_class(checkpoint, self)
        sd, prefixes = checkpoint["state_dict"], tuple(f"{n}." for n in self.FROZEN)
        for k in [k for k in sd if k.startswith(prefixes)]:
            del sd[k]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the frozen stages back for a strict load (the class and data are checked where the file is read)."""
        for name in self.FROZEN:
            if (module := getattr(self, name, None)) is not None:
                for k, v in module.state_dict().items():
                    checkpoint["state_dict"].setdefault(f"{name}.{k}", v)
                freeze_(module)

    def load_earlier(self, name: str, path: str, cls: type, data_spec: Mapping[str, Any] | None,
                     own_weights: bool = False) -> Any:
        """The frozen earlier stage ``name`` from ``path``, checked against ``data_spec`` and the recorded
        ``<name>_sha256`` (of the module, or with ``own_weights`` its ``model``)."""
        with own_hparams():
            module = load_frozen(path, cls, data_spec=data_spec, data_spec_keys=self.spec_keys(data_spec or {}))
        sha = fingerprint(module.model if own_weights else module)
        recorded = self.hparams.get(f"{name}_sha256")
        if recorded is not None and recorded != sha:
            raise HandoffError(
                f"stage checkpoint {str(path)!r}: the {name} there is not the one this {type(self).__name__} was "
                f"trained with (sha256 {sha[:16]}... != recorded {recorded[:16]}...); retrain this stage or "
                f"restore that {name} checkpoint")
        self.hparams[f"{name}_sha256"] = sha
        return module

    def spec_keys(self, spec: Mapping[str, Any]) -> list[str]:
        """The keys of ``spec`` this stage compares."""
        return [k for k in self.SPEC_KEYS if k in spec]

    def check_data(self, spec: Mapping[str, Any], where: str) -> None:
        """Raise when the datamodule's data_spec does not fit this module (stages add their own checks)."""
        if self.hparams.get("data_spec") is not None:
            check_data_spec(self.hparams["data_spec"], spec, where, self.spec_keys(spec))

    def setup(self, stage: str) -> None:
        """Check the datamodule's data_spec (recorded when fitting) and token shards; apply ``init_from`` at fit."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(dm, "data_spec", None)
        if spec is None and self.hparams.get("data_spec") is None:
            raise ValueError(f"{type(self).__name__} needs a datamodule with a data_spec (docs/contracts.md)")
        if spec is not None:
            self.check_data(spec, f"{type(self).__name__} (its data_spec vs datamodule {type(dm).__name__}'s)")
            if stage == "fit":  # the checkpoint describes the data it is trained on (its clock included)
                self.hparams["data_spec"] = dict(spec)
        if "tokenizer" in self.FROZEN:
            where = f"{type(self).__name__} ({self.hparams.tokenizer_ckpt})"
            check_token_tokenizer(dm, self.hparams.tokenizer_sha256, where)
        if stage == "fit" and (path := self.hparams.get("init_from")):
            n = init_from_checkpoint(self, path, self.INIT_FROM_SPEC_KEYS)
            rank_zero_info(f"[whale] {type(self).__name__}: {n} tensors initialised from {path} (weights only; "
                           "new optimiser and schedule)")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Rebuild from a checkpoint safely (``lit/checkpoint.py``: no unpickling; older arguments mapped)."""
        return load_module(checkpoint_path, cls, map_location=map_location or "cpu", **kwargs)
