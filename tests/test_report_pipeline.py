"""The stage pipeline's bookkeeping and the demo report, on hand-made run directories."""

import json

from whale_pl import pipeline, report


def test_report_names_missing_inputs_and_tables_present_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "demo"
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "DONE").write_text(json.dumps({"seconds": 12.5}))
    (root / "video_metrics.json").write_text(json.dumps({"psnr": 25.25, "ssim": 0.75, "fvd": None,
                                                         "num_clips": 16, "ckpt": "x.ckpt"}))
    md = report.build_report("demo", tmp_path / "runs")
    assert "| tokenizer | complete | 12.500 |" in md
    assert "| behavior | missing |" in md
    assert "| dynamics model | 25.250 | 0.750 | — | 16 |" in md
    assert "| copy the last real frame | — | — | — | 16 |" in md  # not in this file: no figures
    assert "_missing: " in md and "experiment.md (run `python -m whale_pl.experiment --scale demo`)" in md


def test_report_reads_the_dynamics_validation_from_tensorboard(tmp_path, monkeypatch):
    """The last logged val/ scalars of runs/<scale>/dynamics (real TensorBoard events) and its clock."""
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    monkeypatch.chdir(tmp_path)
    assert "no TensorBoard events" in report.build_report("demo", tmp_path / "runs")
    log = TensorBoardLogger(str(tmp_path / "runs" / "demo"), name="dynamics", version="")
    for step, acc in ((100, 0.80), (200, 0.87)):
        log.log_metrics({"val/acc": acc, "val/copy_acc": 0.86, "val/acc_minus_copy": acc - 0.86,
                         "val/psnr_ar_ood": 24.5}, step=step)
    log.experiment.flush()
    ckpt = tmp_path / "runs" / "demo" / "dynamics" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": {"data_spec": {"frame_stride": 8}}}, ckpt)
    md = report.build_report("demo", tmp_path / "runs")
    assert "| teacher-forced token accuracy | 0.870 |" in md
    assert "| copy-the-previous-frame baseline | 0.860 |" in md and "| accuracy minus copy | +1.000 pt |" in md
    assert "| 8-step autoregressive PSNR (dB), `ood` episodes (held-out policies: `ood_params` and `ood_families`) | 24.500 |" in md
    assert "training-family episodes | missing (not logged) |" in md
    assert "global step 200" in md and "one step = 8 recorded steps" in md


def test_report_says_why_the_ood_rollout_psnr_is_not_logged(tmp_path, monkeypatch):
    """A stage that validates on the training families only (the configs' `val_splits: [val]`) logs no OOD PSNR."""
    from lightning.pytorch.loggers import TensorBoardLogger

    monkeypatch.chdir(tmp_path)
    log = TensorBoardLogger(str(tmp_path / "runs" / "demo"), name="dynamics", version="")
    log.log_metrics({"val/acc": 0.9, "val/psnr_ar_train_family": 26.0}, step=10)
    log.experiment.flush()
    md = report.build_report("demo", tmp_path / "runs")
    assert "training-family episodes | 26.000 |" in md
    assert "`ood_families`) | not logged: the stage validates on its `val_splits` only" in md


def test_run_until_reuses_complete_stages_and_names_missing_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for st in pipeline.STAGES:
        d = tmp_path / "runs" / "demo" / st
        d.mkdir(parents=True)
        (d / "DONE").write_text("{}")
    (tmp_path / "stages" / "demo").mkdir(parents=True)
    for st in pipeline.STAGES:
        (tmp_path / "stages" / "demo" / f"{st}.yaml").write_text("{}")
    pipeline.run_until("demo", "dynamics")  # all complete: nothing is trained, nothing raised
    try:
        pipeline.stage_config("nosuch", "tokenizer")
    except FileNotFoundError as e:
        assert "nosuch" in str(e) and "demo" in str(e)
    else:
        raise AssertionError("a missing config must raise")
