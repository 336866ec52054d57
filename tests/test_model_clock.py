"""A dynamics model trained on every 2nd recorded frame (data ``frame_stride`` 2) keeps that clock
downstream: its checkpoint records it, GIFs and video metrics read every 2nd frame with composed
actions, and value evaluation holds each decision 2 simulator steps (and refuses real rollouts on
another clock)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_rollout_gifs import read_gif_frames  # (tests/ is on sys.path under pytest)
from whale_pl.rollout.gif import layout, upscale

K_CLOCK = 2


@pytest.fixture(scope="module")
def strided_ckpt(tiny_world) -> Path:
    return tiny_world("clock_ckpts", frame_stride=K_CLOCK, tok_steps=2, dyn_steps=3)


def test_checkpoint_records_the_clock(strided_ckpt):
    from whale_pl.rollout.value import WorldModel, frame_stride_of

    assert frame_stride_of(strided_ckpt) == K_CLOCK
    wm = WorldModel.load(strided_ckpt)
    assert wm.frame_stride == K_CLOCK and wm.normaliser.base == K_CLOCK


def test_gifs_show_every_kth_frame(strided_ckpt, tiny_shards, tmp_path):
    import json

    from whale_pl.data.datamodule import ClipDataModule
    from whale_pl.rollout.gif import SCALE, write_gifs

    index = write_gifs(str(strided_ckpt), str(tiny_shards), tmp_path, "whale eval gifs ...")
    c = index["clips"][0]  # the 24-horizon is more than the 24-frame episodes hold at stride 2: what they have
    assert c["split"] == "val" and c["horizon"] == (24 - 1) // K_CLOCK + 1 - 1 == 11
    ep = {e.meta["episode_id"]: e for e in ClipDataModule(str(tiny_shards), num_workers=0).episodes("val")}[
        c["episode"]]
    frames = read_gif_frames(tmp_path / c["gif"])
    lay = layout((32, 32), SCALE)
    for t, f in enumerate(frames):
        x0, y0, x1, y1 = lay.real
        shown = f[y0:y1, x0:x1].astype(float)
        want = upscale(ep.frames[K_CLOCK * (1 + t)], SCALE).astype(float)
        other = upscale(ep.frames[1 + t], SCALE).astype(float)
        err = ((shown - want) ** 2).mean()
        assert 10 * np.log10(255**2 / max(err, 1e-9)) > 35
        if t > 0:
            assert ((shown - other) ** 2).mean() > err  # not the stride-1 frame
    assert json.loads((tmp_path / "index.json").read_text())["clips"][0]["gif"] == c["gif"]


@pytest.mark.filterwarnings("ignore:Constant")
def test_value_evaluation_holds_decisions_for_the_clock(strided_ckpt, tiny_data_yaml):
    from whale_pl.rollout.value import EvalSet, WorldModel, collect_real, evaluate_values, frame_stride_of

    wm = WorldModel.load(strided_ckpt)
    ev = EvalSet.from_data_config(tiny_data_yaml, starts=1, horizon=3, frame_stride=frame_stride_of(strided_ckpt))
    ev.tasks = ev.tasks[:1]
    real = collect_real(ev, progress=False)
    res = evaluate_values(wm, real, ev, modes=("open_loop", "closed_loop"), progress=False)
    assert res["horizon"] == 3 and np.shape(res["closed_loop"]["imagined_TPK"]) == (1, len(ev.policies), 1)
    ctx, _, acts = res["_rollouts"][0]
    held = wm.normaliser.normalise_held(real.actions[: ctx.shape[0]])
    np.testing.assert_allclose(acts.numpy(), held, atol=1e-6)
    # a held decision moves the arm twice as far as one recorded step: the normalised xyz differ
    assert not np.allclose(held[..., :3], wm.normaliser.normalise(real.actions[: ctx.shape[0]])[..., :3])


def test_video_metrics_read_clips_on_the_clock(strided_ckpt, tiny_shards):
    from whale_pl.eval_cli import evaluate_video
    from whale_pl.lit.dynamics_module import DynamicsModule

    module = DynamicsModule.load_from_checkpoint(str(strided_ckpt), map_location="cpu")
    out = evaluate_video(module, tiny_shards, num_clips=2, clip_len=4)
    assert out["frame_stride"] == K_CLOCK and np.isfinite(out["psnr"])


def test_video_metrics_carry_the_copy_baseline_on_the_same_clips(strided_ckpt, tiny_shards, monkeypatch):
    """copy_psnr / copy_ssim score the last real context frame held on exactly the clips the model is scored
    on: a model that imagines that very frame gets the copy figures."""
    from whale_pl.eval_cli import evaluate_video
    from whale_pl.lit.dynamics_module import DynamicsModule

    module = DynamicsModule.load_from_checkpoint(str(strided_ckpt), map_location="cpu")
    out = evaluate_video(module, tiny_shards, num_clips=3, clip_len=4)
    assert np.isfinite(out["copy_psnr"]) and 0 < out["copy_ssim"] <= 1 and out["copy_psnr"] != out["psnr"]
    real_eval = module.eval_videos
    monkeypatch.setattr(module, "eval_videos", lambda b: (lambda r: (r, module.copy_videos(b, r)))(real_eval(b)[0]))
    copied = evaluate_video(module, tiny_shards, num_clips=3, clip_len=4)
    assert copied["psnr"] == pytest.approx(out["copy_psnr"]) and copied["ssim"] == pytest.approx(out["copy_ssim"])
