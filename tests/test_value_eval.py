"""Policy evaluation in imagination: discounting by hand; the value and uncertainty
summaries end to end on tiny real checkpoints (the shared ``tiny_dynamics`` fixture; renders Meta-World)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whale_pl.rollout.value import discounted_return


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
    env = MetaWorldEnv("push-v3", 16, "corner2")
    try:
        for i, pol in enumerate(real.policy):
            ep = rollout(env, pol, real.seed[i], 3, action_repeat=3 * frame_stride)
            np.testing.assert_array_equal(real.frames[i], ep.frames)
            np.testing.assert_array_equal(real.rewards[i], ep.rewards)
        assert not np.array_equal(real.state[0], rollout(env, real.policy[0], real.seed[0], 3).state)
    finally:
        env.close()


@pytest.mark.filterwarnings("ignore:Constant")
def test_value_and_uncertainty_summaries_end_to_end(tiny_dynamics, tiny_data_yaml, tiny_config, tmp_path):
    """Returns per episode, figures per split with intervals, the copy baseline beside the rollouts,
    uncertainty within step indices (retracing and a 2-member ensemble), the plots."""
    from whale_pl.rollout.value import (EvalSet, WorldModel, collect_real, evaluate_values, rollout_errors,
                                        uncertainty_summary)
    from whale_pl.rollout.retracing import ensemble_uncertainty, retracing_uncertainty
    from whale_pl.rollout.value_metrics import MODES, split_values, video_summary, write_plots

    H, cfg = 6, tiny_config
    wm, member = (WorldModel.load(c) for c in tiny_dynamics)
    ev = EvalSet.from_data_config(tiny_data_yaml, starts=1, horizon=H, frame_stride=wm.frame_stride)
    real = collect_real(ev, progress=False)
    r = evaluate_values(wm, real, ev, modes=MODES, progress=False)
    errors = rollout_errors(wm, real, r["_rollouts"], baselines=True)
    res = {"returns": r, "value": split_values(r, *[{m: [r[m]["imagined_TPK"]] for m in MODES}] * 2),
           "video": video_summary({"model": errors}, np.array([ev.split_of(p) for p in real.policy])),
           "uncertainty": uncertainty_summary(wm, r["_rollouts"], errors, 3, [wm, member])}
    pols = cfg.train_policies + cfg.ood_policies
    assert r["policies"] == pols and r["split"] == ["val"] * len(cfg.train_policies) + ["ood_params"] * len(
        cfg.ood_policies)
    assert np.shape(r["real_TPK"]) == (len(cfg.tasks), len(pols), 1) and np.ptp(r["real_TPK"]) > 0
    for mode in MODES:
        assert np.shape(r[mode]["imagined_TPK"]) == np.shape(r["real_TPK"])
        f = res["value"][mode]["all"]
        assert f["value_gap"]["on"] >= 0 and 0 <= f["regret_at_1"]["on"] <= 1
        assert f["value_gap"]["on_ci"][0] <= f["value_gap"]["on"] <= f["value_gap"]["on_ci"][1]
        ood = res["value"][mode]["ood_params"]  # one OOD policy: a gap on the task's range, no ranking figures
        assert ood["value_gap"]["on"] >= 0 and np.isnan(ood["spearman"]["on"]) and np.isnan(ood["regret_at_1"]["on"])
    assert {"model", "copy the last real frame", "tokenizer reconstruction"} <= set(res["video"]["all"])
    u = res["uncertainty"]
    # two differently seeded members disagree somewhere; one model's retracing anchors do too
    ctx, imag, acts = r["_rollouts"][0]
    ids = torch.cat([ctx, imag[:, :-1]], 1)
    ens = ensemble_uncertainty([wm.model, member.model], ids, acts, first=1, codebook_VE=wm.codebook_VE,
                               z_fns=[wm.z_fn, member.z_fn])
    ret = retracing_uncertainty(wm.model, ids, acts, wm.normaliser, first=1, K=3, codebook_VE=wm.codebook_VE,
                                z_fn=wm.z_fn)
    assert ens["disagreement_BT"].shape == ret["disagreement_BT"].shape == (len(ctx), H - 1)
    assert ens["disagreement_BT"].max() > 0 and ret["disagreement_BT"][:, 1:].max() > 0
    for target in ("mse", "token_err"):
        assert set(u[target]["scores"]) == {"retracing", "ensemble", "step index"}
        for q in u[target]["scores"].values():
            assert np.isnan(q["auroc_within"]) or 0 <= q["auroc_within"] <= 1
            assert len(q["auroc_per_step"]) == H - 2
    plots = write_plots(res, tmp_path / "value", {"model": {m: [r[m]["imagined_TPK"]] for m in MODES}},
                        ("returns", "step_auroc"), ("t", "t"))
    assert len(plots) == 2
    for png in plots.values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore:Constant")
def test_value_hook_reports_each_split_and_leaves_out_undefined_figures(tiny_dynamics, tiny_data_yaml):
    """The EvalCallback's value hook: flat floats ``<split>_<figure>`` per split and ``all``; a figure that is
    undefined (the tiny data's single OOD policy has no ranking) is left out, never NaN."""
    from whale_pl.rollout.value import value_metrics_for_checkpoint

    out = value_metrics_for_checkpoint(str(tiny_dynamics[0]), data_config=str(tiny_data_yaml), starts=1, horizon=3)
    assert {"val_value_gap", "val_bias", "val_spearman", "all_regret_at_1", "ood_params_value_gap"} <= set(out)
    assert "ood_params_spearman" not in out and "ood_params_regret_at_1" not in out
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
