"""The ``whale`` command: LightningCLI fit on the demo tokenizer YAML (shrunk to the tiny
dataset), resumable checkpoints at the documented paths, and subcommand dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from whale_pl import cli

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--model.init_args.net.frame_size", "[32, 32]", "--model.init_args.net.dim", "32",
          "--model.init_args.net.enc_depth", "1", "--model.init_args.net.dec_depth", "1", "--model.init_args.net.heads", "2",
          "--model.init_args.net.codebook_size", "32", "--model.init_args.net.code_dim", "8",
          "--model.init_args.optim.warmup_steps", "1",
          "--data.init_args.clip_len", "4", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
          "--data.init_args.steps_per_epoch", "2", "--data.init_args.val_steps", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_fit_and_resume_through_the_cli(tiny_data_yaml, tmp_path):
    cfg = str(ROOT / "stages" / "demo" / "tokenizer.yaml")
    common = ["--config", cfg, "--data.init_args.config", str(tiny_data_yaml),
              "--trainer.logger.init_args.save_dir", str(tmp_path), *SHRINK]
    cli.main(["fit", *common, "--trainer.max_steps", "2"])
    run = tmp_path / "tokenizer"
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    assert last.is_file() and best.is_file() and (run / "config.yaml").is_file()
    assert torch.load(last, weights_only=True)["global_step"] == 2
    # resume from last.ckpt to a later step
    cli.main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", str(last)])
    ck = torch.load(last, weights_only=True)
    assert ck["global_step"] == 4
    assert ck["hyper_parameters"]["data_spec"]["frame_size"] == [32, 32]


def test_cli_rejects_frame_size_mismatch_before_training(tiny_data_yaml, tmp_path):
    cfg = str(ROOT / "stages" / "demo" / "tokenizer.yaml")
    with pytest.raises(ValueError, match=r"data frame_size \[32, 32\] differs .*\[64, 64\]"):
        cli.main(["fit", "--config", cfg, "--data.init_args.config", str(tiny_data_yaml),
                  "--trainer.logger.init_args.save_dir", str(tmp_path), *SHRINK,
                  "--model.init_args.net.frame_size", "[64, 64]", "--trainer.max_steps", "1"])
    assert not (tmp_path / "tokenizer" / "checkpoints").exists()


@pytest.mark.parametrize("scale", ["demo", "whale_st", "whale_x"])
def test_stage_configs_parse(scale):
    """Every scale's YAML names real classes and valid arguments (parsed, not instantiated: the
    whale_x tokenizer alone would allocate 114M parameters)."""
    import jsonargparse

    cfg = yaml.safe_load((ROOT / "stages" / scale / "tokenizer.yaml").read_text())
    for section in ("model", "data"):
        cls = cli_import(cfg[section]["class_path"])
        parser = jsonargparse.ArgumentParser()
        parser.add_class_arguments(cls, section)
        parser.parse_object({section: cfg[section]["init_args"]})
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == f"runs/{scale}"
    assert cfg["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/psnr"


def cli_import(path: str):
    import importlib

    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def test_subcommand_dispatch(capsys):
    assert cli.main(["eval", "--help"]) == 0  # handed to whale_pl.eval_cli.main
    assert "whale eval" in capsys.readouterr().out
    import importlib

    for module in cli.SUBCOMMANDS.values():  # no route leads nowhere
        assert callable(importlib.import_module(module).main), module
    with pytest.raises(SystemExit, match="unknown subcommand 'imagine'"):
        cli.main(["imagine", "--help"])
    with pytest.raises(SystemExit, match="unknown subcommand 'fitt'"):
        cli.main(["fitt"])
