"""The planner in imagination (whale_pl.plan): it picks the best penalised candidate, λ trades return for
certainty, z is the prior over the real-then-imagined history, bad settings are refused by name, and the
real evaluation starts from states disjoint from the dataset's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whale_pl.plan.cem import History, PlanConfig, PlanConfigError, Planner, load_plan_yaml, shared_prefix_prior
from whale_pl.plan.cli import compare, with_interval
from whale_pl.plan.evaluate import check_disjoint, planned_episode
from whale_pl.rollout.value import WorldModel, start_seeds

CFG = dict(samples=6, horizon=3, iterations=2, elites=2, context=2, K=2)


@pytest.fixture(scope="module")
def wm(tiny_world):
    """A tiny trained world model (behavior off), decoding greedily so a candidate's score is reproducible."""
    w = WorldModel.load(tiny_world("plan_ckpts"))
    w.temperature = 0.0
    return w


def _history(wm: WorldModel, T: int = 2, seed: int = 0) -> History:
    g = torch.Generator().manual_seed(seed)
    V, (h, w) = wm.model.codebook_size, wm.model.grid_hw
    return History(torch.randint(0, V, (T, h, w), generator=g), torch.randn(T - 1, wm.model.action_dim, generator=g))


@pytest.mark.parametrize("penalty,lam", [("none", 0.0), ("retracing", 5.0)])
def test_planner_returns_the_best_penalised_candidate(wm, penalty, lam):
    planner = Planner(wm, PlanConfig(**CFG), penalty, lam, seed=1)
    hist = _history(wm)
    out = planner.plan(hist)
    cands = np.concatenate([c for c, _ in out["candidates"]])
    direct = planner.score(hist, cands)  # every candidate of every iteration, scored again in one batch
    want = direct["return_N"] - lam * direct["uncertainty_NH"].sum(-1)
    assert torch.allclose(direct["score_N"], want)
    best = int(torch.argmax(direct["score_N"]))
    np.testing.assert_allclose(out["actions_raw_HA"], cands[best])
    assert out["best"]["score"] == pytest.approx(float(direct["score_N"][best]), abs=1e-4)
    assert len(cands) == CFG["samples"] * CFG["iterations"] and (np.abs(cands) <= 1).all()


def test_larger_lambda_chooses_lower_uncertainty(wm):
    cfg = PlanConfig(**{**CFG, "iterations": 1})
    hist = _history(wm, seed=3)
    picks = {}
    for lam in (0.0, 1e6):
        out = Planner(wm, cfg, "retracing", lam, seed=7).plan(hist)  # same seed: the same candidates
        picks[lam] = float(out["best"]["uncertainty_NH"].sum())
    u_all = Planner(wm, cfg, "retracing", 0.0).score(hist, out["candidates"][0][0])["uncertainty_NH"].sum(-1)
    assert float(u_all.max() - u_all.min()) > 0  # the candidates differ in uncertainty
    assert picks[1e6] <= picks[0.0]
    assert picks[1e6] == pytest.approx(float(u_all.min()), abs=1e-5)


def test_z_is_the_prior_over_real_then_imagined_history(wm, monkeypatch):
    """With a behavior-conditioned model, z at each imagined step is the prior run on the history so far: the
    same rollout as with z computed once on the final (real + imagined) history by a causal prior."""
    from whale_pl.models.dynamics import DynamicsModel

    m = wm.model
    torch.manual_seed(0)
    beh = DynamicsModel(m.codebook_size, m.grid_hw, m.action_dim, behavior_dim=3, max_frames=m.max_frames,
                        max_stride=m.max_stride, dim=32, depth=1, heads=2).eval()

    def prior(ids_BThw, actions_BTA):  # causal: z_t depends on frames and actions <= t
        x = torch.stack([ids_BThw.float().mean((2, 3)) / m.codebook_size, actions_BTA[..., 0], actions_BTA[..., 1]], -1)
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)

    monkeypatch.setattr(wm, "model", beh)
    monkeypatch.setattr(wm, "z_fn", prior)
    planner = Planner(wm, PlanConfig(**CFG))
    hist = _history(wm, T=3)
    cand = np.random.default_rng(0).uniform(-1, 1, (5, 3, m.action_dim)).astype(np.float32)
    got = planner.score(hist, cand)
    ctx, acts, z_fn = planner._inputs(hist, cand)
    full_ids = torch.cat([ctx, got["ids_NHhw"]], 1)
    acts_pad = torch.cat([acts, torch.zeros_like(acts[:, :1])], 1)  # no action is taken at the last frame
    z_full = prior(full_ids, acts_pad)
    ref = beh.imagine(ctx, acts, z_full, horizon=3, steps=planner.steps, temperature=0.0)
    assert torch.equal(ref["ids_BThw"], got["ids_NHhw"])
    assert torch.allclose(ref["reward_BT"], got["reward_NH"])
    shared = shared_prefix_prior(prior, 1)  # the real prefix is run once and broadcast: the same z
    assert torch.allclose(shared(full_ids[:, :1], acts[:, :1]), prior(full_ids[:, :1], acts[:, :1]))
    assert torch.allclose(shared(full_ids, acts_pad), z_full)


@pytest.mark.parametrize("kw,name", [(dict(samples=1), "samples=1"), (dict(horizon=0), "horizon=0"),
                                     (dict(elites=9, samples=8), "elites=9"), (dict(discount=1.5), "discount=1.5")])
def test_bad_config_refused_by_name(kw, name):
    with pytest.raises(PlanConfigError, match=name):
        PlanConfig(**kw).check()


def test_horizon_beyond_the_models_frames_refused(wm):
    F = wm.model.max_frames
    with pytest.raises(PlanConfigError, match=f"horizon={F}.*max_frames"):
        Planner(wm, PlanConfig(**{**CFG, "horizon": F, "context": 2}))


def test_plan_yaml_checked(tmp_path):
    plan, ev = load_plan_yaml("stages/demo/plan.yaml")
    assert plan.samples >= 2 and ev.starts >= 10 and ev.members >= 2
    p = tmp_path / "plan.yaml"
    p.write_text("planner: {samples: 8}\nevaluate: {lambdas: {retracing: [1.0, -2.0]}}\n")
    with pytest.raises(PlanConfigError, match=r"lambdas=\{'retracing': \[1.0, -2.0\]\}.*λ >= 0"):
        load_plan_yaml(p)
    p.write_text("planner: {samples: 1}\n")
    with pytest.raises(PlanConfigError, match="samples=1"):
        load_plan_yaml(p)


def test_start_states_disjoint_from_the_dataset(tiny_config):
    from whale_pl.data.metaworld import CollectConfig, make_jobs

    _, ev = load_plan_yaml("stages/demo/plan.yaml")
    for cfg in (CollectConfig.from_yaml("stages/demo/data.yaml"), tiny_config):
        data = {j.seed for j in make_jobs(cfg)}
        for base, n in ((ev.seed, ev.starts), (ev.tune_seed, ev.tune_starts)):
            seeds = [s for t in cfg.tasks for s in start_seeds(base, t, n)]
            assert len(set(seeds)) == len(seeds) and not set(seeds) & data
            check_disjoint(seeds, cfg)
        evals = {s for t in cfg.tasks for s in start_seeds(ev.seed, t, ev.starts)}
        assert not evals & {s for t in cfg.tasks for s in start_seeds(ev.tune_seed, t, ev.tune_starts)}
    with pytest.raises(ValueError, match="episode seeds of the dataset"):
        check_disjoint([make_jobs(tiny_config)[0].seed], tiny_config)


def test_planned_episode_in_real_metaworld(wm, tiny_config):
    from whale_pl.data.metaworld import MetaWorldEnv

    env = MetaWorldEnv("push-v3", tiny_config.size, tiny_config.camera)
    try:
        planner = Planner(wm, PlanConfig(**{**CFG, "samples": 3, "iterations": 1}), "retracing", 1.0)
        ep = planned_episode(planner, env, start_seeds(40_000, "push-v3", 1)[0], decisions=3, hold=2,
                             keep_frames=True)
    finally:
        env.close()
    assert ep["rewards_D"].shape == (3,) and (ep["rewards_D"] > 0).all()  # push-v3 pays shaped reward
    assert ep["frames"].shape == (4, 32, 32, 3) and ep["imagined_ids"].shape[0] == 3
    assert np.isfinite(ep["imagined_rewards_D"]).all() and (ep["uncertainty_D"] >= 0).all()


def test_paired_verdict():
    idx = np.random.default_rng(0).integers(0, 10, (500, 3, 10))
    a = np.random.default_rng(1).normal(size=(3, 10))
    assert compare(a + 5, a, "A", "B", idx)["verdict"] == "A beats B"
    assert compare(a, a + 5, "A", "B", idx)["verdict"] == "B beats A"
    assert compare(a, a[:, ::-1], "A", "B", idx)["verdict"] == "not distinguishable at this scale"
    one = np.zeros((500, 3, 1), int)  # one start state per task: no interval, no verdict, however large the gap
    assert compare(a[:, :1] + 5, a[:, :1], "A", "B", one)["verdict"] == "undefined"
    assert np.isnan(with_interval(a[:, :1], one)["mean_ci"]).all()


def test_behavior_cloning_fits_the_data():
    from whale_pl.plan.evaluate import best_policies, train_bc

    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 2)) * 0.3
    eps = [{"task": t, "policy": p, "state": (s := rng.normal(size=(64, 5)).astype(np.float32)),
            "actions": np.tanh(s @ W).astype(np.float32), "return": r}
           for t in ("a", "b") for p, r in (("good", 10.0), ("bad", 1.0))]
    bc = train_bc(eps, steps=400)
    err = np.mean([np.abs(bc.act("a", s) - np.tanh(s @ W)).max() for s in eps[0]["state"][:16]])
    assert err < 0.1
    assert {t: v["policy"] for t, v in best_policies(eps).items()} == {"a": "good", "b": "good"}


def test_report_includes_the_mbpo_section_when_mbpo_json_exists(tmp_path):
    from whale_pl.report import build_report

    root = tmp_path / "demo"
    root.mkdir()
    assert "Model-based control" not in build_report("demo", tmp_path)
    (root / "mbpo.json").write_text("{}")
    (root / "mbpo.md").write_text("# Model-based control in imagination (demo scale)\n\n| method |\n|---|\n")
    rep = build_report("demo", tmp_path)
    assert "## Model-based control in imagination" in rep and "whale plan --scale demo" in rep
