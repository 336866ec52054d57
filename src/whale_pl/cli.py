"""The ``whale`` command: ``whale fit|validate|test|predict --config stages/<scale>/<stage>.yaml`` runs a
stage through LightningCLI; ``whale eval ...``, ``whale data ...`` and ``whale plan ...``
go to ``eval_cli``, ``data.cli`` and ``plan.cli``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SUBCOMMANDS = {"eval": "whale_pl.eval_cli", "data": "whale_pl.data.cli", "plan": "whale_pl.plan.cli"}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str], run: bool = True):
    """Build the LightningCLI over any LightningModule / LightningDataModule named in the config."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from whale_pl.lit.checkpoint import migrate_hparams, read_checkpoint
    from whale_pl.lit.handoff import CLASS_KEY, HandoffError

    class WhaleCLI(LightningCLI):
        """LightningCLI whose resume checks the checkpoint's stage and reads it without unpickling."""

        def _parse_ckpt_path(self) -> None:
            """Refuse a resume checkpoint of another stage; else its hyper-parameters become the model's arguments."""
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if not path or not Path(path).is_file():
                return
            where = f"--ckpt_path {path!r}"
            ckpt = read_checkpoint(path, where)
            hp = dict(ckpt.get("hyper_parameters") or {})
            want = getattr(self.config[sub].get("model"), "class_path", None)
            got = ckpt.get(CLASS_KEY) or hp.get("_class_path")
            if want and got and got != want:
                raise HandoffError(f"{where} holds a {got}, but the config trains a {want}: resume a run from its "
                                   f"own checkpoints/last.ckpt")
            if hp and want:
                module, _, name = want.rpartition(".")
                kwargs = migrate_hparams(getattr(importlib.import_module(module), name), hp, where)
                self.config = self.parser.parse_object({sub: {"model": {"class_path": want, "dict_kwargs": kwargs}}},
                                                       self.config)

    return WhaleCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    args=argv, run=run, save_config_kwargs={"overwrite": True})


def _run_lightning(argv: list[str]) -> int:
    """Run a Lightning subcommand; the project's own error, when one stopped it, is printed last and alone."""
    from whale_pl.lit.handoff import HandoffError

    HandoffError.last = None
    try:
        lightning_cli(argv)
    except HandoffError as e:
        raise SystemExit(f"\nwhale: error: {e}") from None
    except (SystemExit, Exception) as e:  # jsonargparse reports it inside its own (long) message
        if not (isinstance(e, SystemExit) and e.code in (0, None)) and HandoffError.last is not None:
            raise SystemExit(f"\nwhale: error: {HandoffError.last}") from None
        raise
    return 0


def main(argv: list[str] | None = None) -> int | None:
    """``whale <subcommand> ...``: a Lightning subcommand, or ``eval`` / ``data`` / ``plan`` handed to their module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: whale {fit,validate,test,predict} --config stages/<scale>/<stage>.yaml [overrides]\n"
              "       whale {eval,data,plan} ...\nLightning subcommands take --help for every option.")
        return 0
    if argv[0] not in LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
        raise SystemExit(f"whale: unknown subcommand {argv[0]!r}; expected one of "
                         f"{', '.join(LIGHTNING_SUBCOMMANDS + tuple(SUBCOMMANDS))}")
    return _run_lightning(argv)


if __name__ == "__main__":
    sys.exit(main())
