"""Policy evaluation in imagination: discounting and the penalised reward by hand; `whale eval value`
end to end on tiny real checkpoints (slow: fits a tokenizer and two dynamics models, renders
Meta-World in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from whale_pl.rollout.value import discounted_return, penalised_reward


def test_discounted_return_by_hand():
    r = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(discounted_return(r, 0.5), [1 + 1 + 1, 0.25])
    np.testing.assert_allclose(discounted_return(torch.tensor(r), 1.0), [7.0, 1.0])


@pytest.mark.filterwarnings("ignore:Constant")
@pytest.mark.parametrize("frame_stride", [1, 2])
def test_real_rollouts_use_the_datasets_action_repeat(tmp_path, frame_stride):
    """EvalSet.from_data_config takes action_repeat from the dataset config, and the real rollouts hold
    each action that long (times the model's frame_stride: one decision per model step): they equal
    the collector's episode from the same start."""
    import yaml

    from whale_pl.data.metaworld import MetaWorldEnv, rollout
    from whale_pl.rollout.value import EvalSet, collect_real

    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"tasks": ["push-v3"], "train_policies": ["noise_0.5"], "ood_policies": ["lag_2"],
                                   "size": 16, "action_repeat": 3}))
    ev = EvalSet.from_data_config(cfg, starts=1, horizon=3, frame_stride=frame_stride)
    assert ev.action_repeat == 3 and ev.frame_stride == frame_stride
    real = collect_real(ev, progress=False)
    assert real.frame_stride == frame_stride
    env = MetaWorldEnv("push-v3", 16, "corner2")
    try:
        for i, pol in enumerate(real.policy):
            ep = rollout(env, pol, real.seed[i], 3, action_repeat=3 * frame_stride)
            np.testing.assert_array_equal(real.frames[i], ep.frames)
            np.testing.assert_array_equal(real.rewards[i], ep.rewards)
        assert not np.array_equal(real.state[0], rollout(env, real.policy[0], real.seed[0], 3).state)
    finally:
        env.close()


def test_penalised_reward_by_hand():
    r = torch.tensor([[1.0, 2.0]])
    u = torch.tensor([[0.5, 0.0]])
    assert torch.equal(penalised_reward(r, u, 2.0), torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="differ"):
        penalised_reward(r, u[:, :1], 1.0)


def _cli(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MUJOCO_GL="egl")
    return subprocess.run([sys.executable, "-m", "whale_pl.cli", "eval", "value", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_cli_names_a_missing_checkpoint(tmp_path):
    p = _cli(["--dynamics", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "v.json")])
    assert p.returncode == 2 and "nope.ckpt" in p.stderr
    assert not (tmp_path / "v.json").exists()


@pytest.fixture(scope="module")
def tiny_dynamics(tiny_data_yaml, tmp_path_factory) -> list[Path]:
    """A tiny tokenizer and two tiny dynamics models (seeds 0, 1; behavior off; retracing clips)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.dynamics_module import DynamicsModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    out = tmp_path_factory.mktemp("value_ckpts")

    def dm():
        return MetaWorldDataModule(config=str(tiny_data_yaml), clip_len=4, batch_size=4, num_workers=0,
                                   steps_per_epoch=6, val_steps=1, retrace_strides=[2, 3], retrace_prob=0.5)

    def fit(module, name, steps):
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=[ModelCheckpoint(dirpath=out / name, filename="best")]).fit(module, dm())
        return out / name / "best.ckpt"

    torch.manual_seed(0)
    tok = fit(TokenizerModule(net=dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2, codebook_size=32, code_dim=8), optim=dict(warmup_steps=1)), "tok", 3)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        dyn = DynamicsModule(tokenizer_ckpt=str(tok), use_behavior=False, net=dict(dim=32, depth=1, heads=2, max_frames=8, max_stride=3), optim=dict(warmup_steps=1), sampling=dict(rollout_horizon=2, rollout_batches=1))
        ckpts.append(fit(dyn, f"dyn{seed}", 6))
    return ckpts


@pytest.mark.slow
def test_whale_eval_value_end_to_end(tiny_dynamics, tiny_data_yaml, tiny_config, tmp_path):
    out = tmp_path / "value.json"
    H = 6
    p = _cli(["--dynamics", str(tiny_dynamics[0]), "--ensemble", *map(str, tiny_dynamics), "--data-config",
              str(tiny_data_yaml), "--starts", "1", "--horizon", str(H), "--K", "3", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    v = res["value"]
    n_pol = len(tiny_config.train_policies) + len(tiny_config.ood_policies)
    assert v["policies"] == tiny_config.train_policies + tiny_config.ood_policies
    assert v["split"].count("ood") == len(tiny_config.ood_policies)
    assert v["episodes"] == n_pol * len(tiny_config.tasks)
    assert np.ptp(v["real_return"]) > 0  # the policies' real returns differ
    for mode in ("open_loop", "closed_loop"):
        f = v[mode]["all"]
        assert len(v[mode]["imagined_return"]) == n_pol
        assert f["value_gap"] >= 0 and 0 <= f["regret_at_1"] <= 1
    u = res["uncertainty"]
    B = v["episodes"]
    for k in ("mse", "token_err", "retracing_score", "ensemble_score"):
        assert np.asarray(u["per_step"][k]).shape == (B, H - 1)
    assert u["steps_scored"] == B * (H - 2)
    # two differently seeded members disagree somewhere; one model's retracing anchors do too
    assert np.asarray(u["per_step"]["ensemble_disagreement"]).max() > 0
    assert np.asarray(u["per_step"]["retracing_disagreement"])[:, 1:].max() > 0
    for q in u["quality_vs_mse"].values():
        assert q["auroc"] is None or 0 <= q["auroc"] <= 1
    for png in res["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
