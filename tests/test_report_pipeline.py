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
    assert "| 25.250 | 0.750 | — | 16 |" in md
    assert "missing: " in md and "experiment.json" in md


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
