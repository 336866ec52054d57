"""The ``whale`` command.

``whale fit|validate|test|predict --config stages/<scale>/<stage>.yaml`` trains / evaluates a stage
through LightningCLI; the YAML names the LightningModule and the datamodule by ``class_path``.
``whale eval ...`` and ``whale data ...`` hand their arguments to ``whale_pl.eval_cli`` and
``whale_pl.data.cli`` (imported only when asked for).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "eval": "whale_pl.eval_cli",
    "data": "whale_pl.data.cli",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str], run: bool = True):
    """Build the LightningCLI over any LightningModule / LightningDataModule named in the config."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


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
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
