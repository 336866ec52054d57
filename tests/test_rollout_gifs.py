"""Rollout GIFs: the writer (one frame per step, both panels pixel-exact, a cursor that moves along
the uncertainty curve), `whale eval gifs` end to end on a tiny trained dynamics model, and the
report embedding them with their regenerate command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from whale_pl.rollout.gif import CURSOR_COLOR, layout, upscale, write_rollout_gif


def read_gif_frames(path) -> list[np.ndarray]:
    """Every frame of a GIF as uint8 RGB ``[h, w, 3]``."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


def _crop(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def _few_colour_frames(rng, T: int, n_colours: int, hw=(16, 20)) -> np.ndarray:
    pal = rng.integers(0, 256, (n_colours, 3), dtype=np.uint8)
    return pal[rng.integers(0, n_colours, (T, *hw))].transpose(0, 3, 1, 2).copy()  # [T, 3, H, W]


def test_gif_has_a_frame_per_step_with_both_panels_exact_and_a_moving_cursor(tmp_path):
    rng = np.random.default_rng(0)
    T, s = 7, 3
    real = _few_colour_frames(rng, T, 40)
    imag_u8 = _few_colour_frames(rng, T, 40)
    imagined = torch.as_tensor(imag_u8).float() / 127.5 - 1  # float input in [-1, 1]
    unc = rng.random(T)
    unc[0] = np.nan  # a step without a score
    err = rng.random(T)
    path = tmp_path / "sub" / "clip.gif"
    lay = write_rollout_gif(path, real, imagined, unc, err, scale=s, title="val | push-v3 | expert")
    assert path.read_bytes()[:6] == b"GIF89a"
    assert [p.name for p in path.parent.iterdir()] == ["clip.gif"]  # no temporary left behind
    frames = read_gif_frames(path)
    assert len(frames) == T
    cursor_x = []
    for t, f in enumerate(frames):
        assert f.shape == (lay.height, lay.width, 3)
        np.testing.assert_array_equal(_crop(f, lay.real), upscale(real[t].transpose(1, 2, 0), s))
        np.testing.assert_array_equal(_crop(f, lay.imagined), upscale(imag_u8[t].transpose(1, 2, 0), s))
        cols = np.where((_crop(f, lay.plot) == CURSOR_COLOR).all(-1).sum(0) > 20)[0]
        assert len(cols) >= 1, f"no cursor line in frame {t}"
        cursor_x.append(cols.mean())
    assert np.all(np.diff(cursor_x) > 0), cursor_x  # the marker walks along the horizon


# ---------------------------------------------------------------------------------------------
# end to end on a tiny trained model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dynamics_ckpt(tiny_world) -> Path:
    """A tiny tokenizer and a tiny dynamics model (behavior off, strides up to 3), a few steps each."""
    return tiny_world("gif_ckpts")


H = 23  # the 24-frame episodes after a 1-frame context; longer than max_frames=8: the window restarts on the way


@pytest.fixture(scope="module")
def gif_run(tiny_dynamics_ckpt, tiny_shards, tmp_path_factory) -> Path:
    """`whale eval gifs` into runs/demo/gifs of a fresh runs directory; returns that runs directory."""
    from whale_pl.eval_cli import main

    runs = tmp_path_factory.mktemp("gif_runs") / "runs"
    rc = main(["gifs", "--ckpt", str(tiny_dynamics_ckpt), "--shards", str(tiny_shards), "--out",
               str(runs / "demo" / "gifs")])
    assert rc == 0
    return runs


def test_gifs_command_writes_one_gif_per_clip_consistent_with_the_shards(gif_run, tiny_shards, tiny_config):
    from whale_pl.data.datamodule import ClipDataModule

    out = gif_run / "demo" / "gifs"
    index = json.loads((out / "index.json").read_text())
    assert "whale eval gifs gifs" not in index["command"]
    assert index["command"].startswith("whale eval gifs --ckpt ")
    clips = index["clips"]
    assert [c["split"] for c in clips] == ["val", "val", "ood", "ood"]
    val_pols = {c["policy"] for c in clips if c["split"] == "val"}
    assert len(val_pols) == 2 and val_pols <= set(tiny_config.train_policies)  # two different held-out episodes
    assert {c["policy"] for c in clips if c["split"] == "ood"} <= set(tiny_config.ood_policies)
    assert len({c["episode"] for c in clips}) == 4
    eps = {ep.meta["episode_id"]: ep for sp in ("val", "ood")
           for ep in ClipDataModule(str(tiny_shards), num_workers=0).episodes(sp)}
    for c in clips:
        assert c["horizon"] == H and c["context"] == 1 and c["start"] == 0
        # retracing: step 1 has a single anchor (no score), then 2, then K = 3 anchors
        assert c["n_predictions"][:3] == [1, 2, 3] and set(c["n_predictions"][2:]) == {3}
        assert c["uncertainty"][0] is None and all(u is not None and u >= 0 for u in c["uncertainty"][1:])
        frames = read_gif_frames(out / c["gif"])
        assert len(frames) == H
        ep = eps[c["episode"]]
        lay = layout((32, 32), 3)
        for t, f in enumerate(frames):
            real = upscale(ep.frames[1 + t], 3).astype(float)  # real frame after the 1-frame context
            shown_real = _crop(f, lay.real).astype(float)
            assert 10 * np.log10(255**2 / max(((shown_real - real) ** 2).mean(), 1e-9)) > 35
            # the panels' MSE (in [-1, 1] units) is the index's true per-step error, up to the palette
            shown_imag = _crop(f, lay.imagined).astype(float)
            mse = (((shown_imag - shown_real) / 127.5) ** 2).mean()
            assert mse == pytest.approx(c["mse"][t], rel=0.1, abs=2e-3)


def test_report_embeds_the_gifs_with_their_command(gif_run):
    from whale_pl import report

    md = report.build_report("demo", gif_run)
    index = json.loads((gif_run / "demo" / "gifs" / "index.json").read_text())
    for c in index["clips"]:
        assert f"](gifs/{c['gif']})" in md
    assert index["command"] in md


def test_demo_makes_the_gifs_before_the_report():
    from whale_pl.demo import build_steps

    names = [name for name, _ in build_steps("demo")]
    assert names.index("rollout gifs") < names.index("report")


def test_report_says_each_table_once_and_why_a_figure_is_missing(tmp_path, monkeypatch):
    """``whale eval video``'s table beside copying (FVD missing as —), experiment.md embedded one heading level
    down with its plot links as they are, absent inputs named."""
    from whale_pl import report

    monkeypatch.chdir(tmp_path)
    root = Path("runs") / "demo"
    root.mkdir(parents=True)
    (root / "video_metrics.json").write_text(json.dumps({
        "psnr": 21.5, "ssim": 0.625, "num_clips": 16, "clip_len": 16, "split": "val", "ckpt": "d.ckpt",
        "shards": "data_shards/metaworld/demo", "copy_psnr": 23.25}))  # no "fvd": skipped
    (root / "experiment.md").write_text("# Headline experiment (demo scale)\n\n## Verdicts\n\n- (1) x\n\n"
                                        "![returns (on and off)](experiment_returns.png)\n")
    md = report.build_report("demo", Path("runs"))
    assert "| dynamics model | 21.500 | 0.625 | — | 16 |" in md and "| copy the last real frame | 23.250 | — | — |" in md
    assert "--shards data_shards/metaworld/demo" in md
    assert "## Headline experiment (demo scale)\n\n### Verdicts\n\n- (1) x" in md
    assert md.count("## Verdicts") == 1 and "![returns (on and off)](experiment_returns.png)" in md
    assert "Regenerate: `python -m whale_pl.experiment --scale demo`" in md
    assert "## Rollouts: real against imagined" in md and "missing: runs/demo/gifs/index.json" in md
    assert "whale eval gifs --ckpt runs/demo/dynamics/checkpoints/best.ckpt" in md
