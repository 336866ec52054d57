"""The headline experiment at tiny size: its runs are budgeted in steps, validate (and so choose checkpoints)
on the training families only and are reproducible; its splits are disjoint; its evaluation, plots and
report run end to end on tiny models and the tiny dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from whale_pl import experiment


def _tiny_config(tmp_path: Path, tok: Path, data_yaml: Path) -> Path:
    """A tiny dynamics stage config shaped like stages/demo/dynamics.yaml: a time budget, validation on the
    val and OOD splits, an EvalCallback last."""
    cfg = {"seed_everything": 0,
           "model": {"class_path": "whale_pl.lit.dynamics_module.DynamicsModule", "init_args": {
               "tokenizer_ckpt": str(tok), "use_behavior": True, "optim": {"warmup_steps": 1},
               "net": {"dim": 32, "depth": 1, "heads": 2, "max_frames": 8, "max_stride": 3},
               "sampling": {"rollout_horizon": 2, "rollout_batches": 1}}},
           "data": {"class_path": "whale_pl.data.datamodule.MetaWorldDataModule", "init_args": {
               "config": str(data_yaml), "clip_len": 4, "batch_size": 4, "num_workers": 0, "steps_per_epoch": 2,
               "val_steps": 1, "val_splits": ["val", "ood"]}},
           "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 100, "max_time": "00:00:10:00",
                       "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(tmp_path), "name": "x", "version": ""}},
                       "callbacks": [
                           {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"filename": "best", "monitor": "val/ce", "mode": "min"}},
                           {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"filename": "last", "enable_version_counter": False}},
                           {"class_path": "whale_pl.callbacks.EvalCallback",
                            "init_args": {"num_clips": 1}}]}}
    path = tmp_path / "dynamics.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_command_budgets_in_steps_and_validates_on_training_families(tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "whale_pl.callbacks.EvalCallback"}]}}))
    handoff = ["--model.init_args.tokenizer_ckpt", "t"]
    cmd = experiment.fit_command(cfg, tmp_path / "on", 2, True, 40, handoff, ["--x", "1"])
    args = dict(zip(cmd[4::2], cmd[5::2]))  # after `python -m whale_pl.cli fit`
    assert args["--trainer.max_time"] == "null" and args["--trainer.max_steps"] == "40"
    assert args["--data.init_args.val_splits"] == "[val]" and args["--seed_everything"] == "2"
    assert args["--trainer.callbacks.init_args.every_n_val_epochs"] == "1000000"  # no value hook on OOD policies
    assert args["--model.init_args.use_behavior"] == "true" and cmd[-2:] == ["--x", "1"]


def test_runs_are_reproducible_and_choose_checkpoints_without_ood_data(tiny_dynamics, tiny_data_yaml, tmp_path):
    """Two short fits with one seed give identical weights; the fit's own saved config validates on the
    `val` split only, with no time budget; a finished run made with another budget is refused."""
    cfg = _tiny_config(tmp_path, tiny_dynamics[0].parent.parent / "tok" / "best.ckpt", tiny_data_yaml)
    record = {"seed": 0, "steps": 3, "use_behavior": False, "fit_args": []}
    ckpts = []
    for group, seed in (("a", 0), ("b", 0), ("c", 1)):
        cmd = experiment.fit_command(cfg, tmp_path / group, seed, False, 3, [], [])
        ckpts.append(experiment.train_run(cmd, tmp_path / group / str(seed), dict(record, seed=seed))[0])
    raw = [torch.load(c, map_location="cpu", weights_only=True) for c in ckpts]
    assert raw[0]["global_step"] >= 2
    sd_a, sd_b, sd_c = (r["state_dict"] for r in raw)
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)  # the seed is the only difference, and it counts
    saved = yaml.safe_load((tmp_path / "a" / "0" / "config.yaml").read_text())
    assert saved["data"]["init_args"]["val_splits"] == ["val"]
    assert saved["trainer"]["max_time"] is None and saved["trainer"]["max_steps"] == 3
    assert saved["trainer"]["callbacks"][-1]["init_args"]["every_n_val_epochs"] == 1000000
    assert experiment.train_run([], tmp_path / "a" / "0", record)[0] == ckpts[0]  # reused
    with pytest.raises(SystemExit, match="'steps': 3"):
        experiment.train_run([], tmp_path / "a" / "0", dict(record, steps=5))


def _with_new_families(data_yaml: Path, tmp_path: Path, extra=("sine_0.5", "goal_y0.1")) -> Path:
    """The tiny data config with more OOD policies (by default two families never seen in training)."""
    import yaml

    d = yaml.safe_load(data_yaml.read_text())
    d["ood_policies"] = d["ood_policies"] + list(extra)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "data.yaml"


def test_splits_are_disjoint_and_labelled(tiny_data_yaml, tiny_config, tmp_path):
    from whale_pl.rollout.value import EvalSet

    ev = EvalSet.from_data_config(tiny_data_yaml)
    assert ev.splits == {"val": tiny_config.train_policies, "ood_params": tiny_config.ood_policies}
    assert ev.starts >= 5 and [ev.split_of(p) for p in ev.policies].count("ood_params") == len(tiny_config.ood_policies)
    ev = EvalSet.from_data_config(_with_new_families(tiny_data_yaml, tmp_path, ("sine_0.5", "lag_8", "goal_y0.1")))
    assert ev.splits == {"val": tiny_config.train_policies, "ood_params": ["noise_1.0", "lag_8"],
                         "ood_families": ["sine_0.5", "goal_y0.1"]}
    demo = EvalSet.from_data_config("stages/demo/data.yaml")
    assert len(demo.splits["ood_families"]) >= 2 and len(demo.splits["ood_params"]) >= 2


@pytest.mark.filterwarnings("ignore:Constant")
def test_experiment_evaluates_and_reports_on_tiny_models(tiny_dynamics, tiny_data_yaml, tiny_config, tmp_path,
                                                         monkeypatch):
    """One seed each way (seed 0 on, seed 1 off: any two models), two ensemble members: every table of
    experiment.md, the plots, the one-seed note with the full command, report.md around it."""
    from whale_pl import report
    from whale_pl.rollout.value_metrics import nan_to_none

    monkeypatch.chdir(tmp_path)
    H = 5
    a = argparse.Namespace(data_config=str(_with_new_families(tiny_data_yaml, tmp_path)), starts=1, horizon=H, discount=0.99, seeds=1, members=2,
                           K=3, device="cpu", scale="tiny", steps=6)
    runs = {"on": [{"seed": s, "ckpt": str(c), "seconds": 1.0 + s} for s, c in enumerate(tiny_dynamics)],
            "off": [{"seed": 0, "ckpt": str(tiny_dynamics[1]), "seconds": 1.0}], "seconds": 3.0}
    res = experiment.evaluate(a, runs)
    res.update(scale="tiny", seeds=1, members=2, steps=6, starts=1, horizon=H, discount=0.99, runs=runs,
               train_seconds=3.0, command="python -m whale_pl.experiment --scale tiny --seeds 1", seconds=9.0)
    out = Path("runs") / "tiny"
    experiment.write_plots(res, out)
    json.dumps(nan_to_none(res), allow_nan=False)
    experiment.write_report(res, out / "experiment.md")
    md = (out / "experiment.md").read_text()
    assert "**One-seed version**" in md and "`python -m whale_pl.experiment --scale tiny` (`make experiment`)" in md
    assert "### `val`: training families" in md and "### `ood_params`: new parameters" in md
    assert "### `ood_families`: behavior families never seen in training (sine_0.5, goal_y0.1)" in md
    assert "`ood_families` (behavior families never seen in training): value gap on" in md  # its own verdict line
    # one OOD policy: its value gap is defined (on the task's range over all policies), its correlations and
    # regret are not, and the tables say so
    ood = md.split("### `ood_params`", 1)[1].split("###", 1)[0]
    assert "| value_gap | open_loop | n/a" not in ood and ood.count("| undefined |") == 6
    assert "| regret_at_1 | open_loop | n/a [n/a, n/a] | n/a [n/a, n/a] | n/a [n/a, n/a] | undefined |" in ood
    assert "| step index | pixel MSE | 0.500" in md and "copy the last real frame" in md
    assert res["uncertainty"]["training_cost_ratio"] == pytest.approx(2.0 / 1.0 + 1.0)
    assert res["returns"]["policies"] == tiny_config.train_policies + tiny_config.ood_policies + ["sine_0.5", "goal_y0.1"]
    assert np.shape(res["returns"]["on"]["open_loop"]) == (1, len(tiny_config.tasks), 6, 1)
    for png in res["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({Path(png).name})" in md
    (out / "experiment.json").write_text(json.dumps(nan_to_none(res)))
    full = report.build_report("tiny", Path("runs"))
    assert "## Headline experiment (tiny scale)" in full and "### Verdicts" in full and "**One-seed version**" in full
    assert all(f"({Path(png).name})" in full for png in res["plots"].values())  # report.md sits beside the plots


def test_gpu_script_dry_run_prints_a_budgeted_bf16_pipeline(monkeypatch):
    """``scripts/gpu_experiment.sh --dry-run`` runs nothing and prints every command under a 10-minute limit
    (less when the 15-minute total is smaller), the trainings in bf16 on the GPU without a time budget, the
    experiment with 3 seeds and 5 members as its own parser accepts it, then the report."""
    import shlex
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(repo / "scripts" / "gpu_experiment.sh"), "--dry-run"], capture_output=True,
                         text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TOTAL_S": "500", "SCALE": "dry_run_check"}).stdout
    assert not (repo / "runs" / "dry_run_check").exists()  # nothing ran, nothing was written
    cmds = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert [c[:2] for c in cmds] == [["timeout", "500"]] * len(cmds)  # min(600, what the total leaves)
    mods = [" ".join(c[c.index("-m") + 1: c.index("-m") + 3]) for c in cmds]
    assert mods == ["whale_pl.data.cli metaworld", "whale_pl.pipeline tokenizer", "whale_pl.pipeline behavior",
                    "whale_pl.pipeline dynamics", "whale_pl.eval_cli video", "whale_pl.eval_cli gifs",
                    "whale_pl.experiment --scale", "whale_pl.report --scale"]
    for c in cmds:
        if "whale_pl.pipeline" in c or "whale_pl.experiment" in c:
            assert "bf16-mixed" in c and c[c.index("--trainer.max_time") + 1] == "null"
            assert c[c.index("--trainer.accelerator") + 1] == "gpu"
    monkeypatch.chdir(repo)
    exp = next(c for c in cmds if "whale_pl.experiment" in c)
    a = experiment.parse_args([x.replace("dry_run_check", "demo") for x in exp[exp.index("whale_pl.experiment") + 1:]])
    assert (a.seeds, a.members, a.device, a.steps) == (3, 5, "cuda", 1500)
    assert a.fit_args[a.fit_args.index("--trainer.precision") + 1] == "bf16-mixed"
