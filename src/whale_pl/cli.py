"""The ``whale`` command.

``whale fit|validate|test|predict --config stages/<scale>/<stage>.yaml`` trains / evaluates a stage
through LightningCLI; the YAML names the LightningModule and the datamodule by ``class_path``.
``whale eval ...`` and ``whale data ...`` hand their arguments to ``whale_pl.eval_cli`` and
``whale_pl.data.cli`` (imported only when asked for).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SUBCOMMANDS = {
    "eval": "whale_pl.eval_cli",
    "data": "whale_pl.data.cli",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _resume_check(cli, ckpt_path: str) -> dict | None:
    """The hyper-parameters of a resume checkpoint as this run's model arguments, after refusing a
    checkpoint of another stage (LightningCLI would otherwise rebuild the checkpoint's class)."""
    from whale_pl.lit.checkpoint import CLI_KEYS, migrate_hparams, read_checkpoint
    from whale_pl.lit.handoff import CLASS_KEY, HandoffError

    where = f"--ckpt_path {ckpt_path!r}"
    ckpt = read_checkpoint(ckpt_path, where)
    hp = dict(ckpt.get("hyper_parameters") or {})
    model_cfg = cli.config[cli.config.subcommand].get("model")
    want = getattr(model_cfg, "class_path", None)
    got = ckpt.get(CLASS_KEY) or hp.get("_class_path")
    if want and got and got != want:
        raise HandoffError(f"{where} holds a {got}, but the config trains a {want}: resume a run from its own "
                           f"checkpoints/last.ckpt")
    if not hp or not want:
        return None
    module, _, name = want.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return {"class_path": want, "dict_kwargs": migrate_hparams(cls, {k: v for k, v in hp.items() if k not in CLI_KEYS},
                                                              where)}


def lightning_cli(argv: list[str], run: bool = True):
    """Build the LightningCLI over any LightningModule / LightningDataModule named in the config."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class WhaleCLI(LightningCLI):
        """LightningCLI whose resume checks the checkpoint's stage and reads it without unpickling."""

        def _parse_ckpt_path(self) -> None:
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if not path or not Path(path).is_file():
                return
            hp = _resume_check(self, path)
            if hp is not None:
                self.config = self.parser.parse_object({sub: {"model": hp}}, self.config)

    return WhaleCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


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
    """``whale <subcommand> ...``: a Lightning subcommand, or ``eval`` / ``data`` handed to their module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: whale {fit,validate,test,predict} --config stages/<scale>/<stage>.yaml [overrides]\n"
            "       whale {eval,data} ...\n"
            "Lightning subcommands take --help for every option."
        )
        return 0
    if argv[0] not in LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
        raise SystemExit(
            f"whale: unknown subcommand {argv[0]!r}; expected one of "
            f"{', '.join(LIGHTNING_SUBCOMMANDS + tuple(SUBCOMMANDS))}"
        )
    return _run_lightning(argv)


if __name__ == "__main__":
    sys.exit(main())
