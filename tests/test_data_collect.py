"""Meta-World collection: the tiny session dataset, determinism, policy families, bad names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from whale_pl.data.metaworld import CollectConfig, dataset_status, ensure_collected
from whale_pl.data.policies import SINE_PERIOD, PolicyNameError, ood_split, parse_policy
from whale_pl.data.shards import iter_episodes, verify_dataset


def test_tiny_shards_layout(tiny_shards, tiny_config):
    m = verify_dataset(tiny_shards)
    assert m["frame_size"] == [32, 32] and m["action_dim"] == 4 and m["state_dim"] == 39
    assert {k: v["episodes"] for k, v in m["splits"].items()} == {"train": 12, "val": 6, "ood": 4}
    assert m["families"] == ["expert", "lag", "noise"]
    eps = list(iter_episodes(tiny_shards))
    assert len(eps) == 22
    for ep in eps:
        assert ep.frames.shape == (24, 32, 32, 3) and ep.actions.shape == (24, 4)
        assert ep.is_first[0] and ep.is_last[-1] and ep.is_first.sum() == 1
        assert np.all(np.abs(ep.actions) <= 1.0)
        assert ep.meta["split"] in ("train", "val", "ood")
        assert (ep.meta["split"] == "ood") == (ep.meta["policy"]["name"] == "noise_1.0")
        # upright: corner2's top rows are plain wall, the bottom rows hold the table legs and robot base
        q = ep.frames.shape[1] // 4
        assert ep.frames[:, :q].std() < 10 < 30 < ep.frames[:, -q:].std()
        # frames are real renders that change over time
        assert ep.frames.std() > 5 and np.abs(ep.frames[-1].astype(int) - ep.frames[0]).mean() > 0.5
    # the stats in the manifest are those of the train split
    a = np.concatenate([e.actions for e in eps if e.meta["split"] == "train"]).astype(np.float64)
    np.testing.assert_allclose(m["action_stats"]["mean"], a.mean(0), atol=1e-6)
    np.testing.assert_allclose(m["action_stats"]["std"], a.std(0), atol=1e-6)
    np.testing.assert_allclose(m["action_stats"]["q99"], np.quantile(a, 0.99, axis=0), atol=1e-6)
    assert dataset_status(tiny_config)[0] == "complete"


def test_same_command_same_bytes_any_worker_count(tiny_shards, tiny_config, tmp_path):
    """Re-collect part of the tiny config with 1 worker (2 in the fixture): every episode's sample
    bytes are identical (episode seeds depend on task/policy/split/index only)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config, tasks=["push-v3"], train_policies=["noise_0.5"], workers=1,
                              out=str(tmp_path / "again"))
    ensure_collected(cfg, progress=False)
    first = {e.meta["episode_id"]: e for e in iter_episodes(tiny_shards)}
    again = list(iter_episodes(cfg.out))
    assert len(again) == 5
    for e in again:
        a, b = e.to_sample("k"), first[e.meta["episode_id"]].to_sample("k")
        assert all(a[x] == b[x] for x in ("frames.npz", "steps.npz", "meta.json")), e.meta["episode_id"]
    # a complete dataset of the same config is not collected again
    before = (tmp_path / "again" / "manifest.json").stat().st_mtime_ns
    ensure_collected(cfg, progress=False)
    assert (tmp_path / "again" / "manifest.json").stat().st_mtime_ns == before


def test_episode_bytes_do_not_depend_on_the_previous_episode():
    """The same job gives the same frames whether or not the worker's env ran another episode first."""
    from whale_pl.data.metaworld import Job, episode_seed, iter_collect

    # a pair that exposed a stale goal marker in frame 0 (fixed in MetaWorldEnv.reset)
    cfg = CollectConfig(tasks=["push-v3"], train_policies=["expert"], size=64, max_steps=120, workers=1)
    a = Job("push-v3", "expert", "train", 3, episode_seed(0, "push-v3", "expert", "train", 3))
    b = Job("push-v3", "noise_0.1", "train", 0, episode_seed(0, "push-v3", "noise_0.1", "train", 0))
    alone = list(iter_collect(cfg, [b]))
    after = list(iter_collect(cfg, [a, b]))
    assert after[1].to_sample("k") == alone[0].to_sample("k")


def _returns(task: str, names: list[str], steps: int = 100, n: int = 2) -> dict[str, float]:
    import metaworld

    from whale_pl.data.metaworld import episode_seed

    mt = metaworld.MT1(task, seed=0)
    env = mt.train_classes[task]()  # stepping only, no rendering in the test process
    out = {}
    try:
        for name in names:
            rets = []
            for i in range(n):
                seed = episode_seed(0, task, name, "train", i)
                env.set_task(mt.train_tasks[seed % 50])
                env.seed(seed)
                obs, _ = env.reset()
                pol = parse_policy(name)
                pol.reset(task, np.random.default_rng(seed))
                ret = 0.0
                for _ in range(steps):
                    obs, r, *_ = env.step(pol.act(obs))
                    ret += r
                rets.append(ret)
            out[name] = float(np.mean(rets))
    finally:
        env.close()
    return out


def test_ood_split_is_derived_from_the_training_families():
    train = ["expert", "noise_0.1", "lag_3", "mix_expert+eps_1.0"]
    assert [ood_split(p, train) for p in ("noise_1.0", "lag_8", "mix_noise_0.3+expert", "eps_0.5")] == [
        "ood_params", "ood_params", "ood_params", "ood_params"]  # eps is seen inside the training mixture
    assert [ood_split(p, train) for p in ("sine_0.5", "pause_0.1", "goal_y0.1", "slow_0.5", "mix_expert+sine_1")] == [
        "ood_families"] * 5


@pytest.mark.filterwarnings("ignore:Constant")
def test_new_families_act_as_described():
    """Each family never seen in training departs from the expert on the same states the way its name says."""
    from whale_pl.data.metaworld import MetaWorldEnv, rollout

    env = MetaWorldEnv("push-v3", 32, "corner2")
    try:
        ep = {p: rollout(env, p, 7, 40, 1) for p in ("expert", "sine_0.5", "pause_0.5", "goal_y0.1")}
    finally:
        env.close()
    exp = parse_policy("expert")
    exp.reset("push-v3", np.random.default_rng(0))
    on_pause = np.stack([exp.act(s) for s in ep["pause_0.5"].state])
    paused = np.abs(ep["pause_0.5"].actions[:, :3]).max(1) == 0
    assert paused.sum() >= 4 and np.abs(on_pause[paused, :3]).max() > 0.1  # stopped where the expert would move
    np.testing.assert_allclose(ep["pause_0.5"].actions[~paused], on_pause[~paused], atol=1e-4)
    push_TX = ep["sine_0.5"].actions[:, :3] - np.stack([exp.act(s) for s in ep["sine_0.5"].state])[:, :3]
    w = 2 * np.pi * np.arange(len(push_TX)) / SINE_PERIOD
    basis = np.stack([np.sin(w), np.cos(w)], 1)  # a sine of the family's period explains the push on every axis
    fit = basis @ np.linalg.lstsq(basis, push_TX, rcond=None)[0]
    assert ((fit - push_TX) ** 2).sum() < 0.3 * (push_TX ** 2).sum() and np.abs(push_TX).max() > 0.3
    hand_end = ep["goal_y0.1"].state[-1, :3] - ep["expert"].state[-1, :3]
    assert hand_end[1] > 0.05  # heads for targets 0.1 m along +y


@pytest.mark.filterwarnings("ignore:Constant")
def test_policies_differ_in_return(tiny_shards):
    r = _returns("push-v3", ["expert", "noise_1.0", "slow_0.25", "lag_10"])
    for poor in ("noise_1.0", "slow_0.25", "lag_10"):
        assert r["expert"] > 3 * r[poor], r
    # in the tiny dataset too, the expert's actions differ from the OOD noise policy's
    eps = list(iter_episodes(tiny_shards))
    a = {p: np.concatenate([e.actions for e in eps if e.meta["policy"]["name"] == p]) for p in ("expert", "noise_1.0")}
    assert np.abs(a["noise_1.0"] - a["expert"][: len(a["noise_1.0"])]).mean() > 0.2


def test_policy_names_and_descriptors():
    for name, fam in [("expert", "expert"), ("noise_0.3", "noise"), ("eps_0.5", "eps"), ("slow_0.5", "slow"),
                      ("lag_4", "lag"), ("bias_x0.3", "bias"), ("bias_y-0.3z0.2", "bias"),
                      ("mix_expert+eps_1.0", "mix"), ("sine_0.5", "sine"), ("overshoot_2", "overshoot"),
                      ("pause_0.1", "pause"), ("goal_y0.1", "goal")]:
        p = parse_policy(name)
        d = p.descriptor()
        assert d["name"] == name and d["family"] == fam and json.loads(json.dumps(d)) == d
    assert parse_policy("bias_y-0.3z0.2").params == {"offset": {"y": -0.3, "z": 0.2}}
    assert parse_policy("goal_x0.1z-0.05").params == {"offset": {"x": 0.1, "z": -0.05}}
    for bad in ["experts", "noise_x", "slow_1.5", "lag_2.5", "bias_q0.3", "mix_expert", "eps_2", "", "overshoot_0.8",
                "sine_0", "pause_1.5", "goal_g0.1"]:
        with pytest.raises(PolicyNameError, match="valid names|must be|cannot"):
            parse_policy(bad)
    with pytest.raises(PolicyNameError, match="noise_<sigma>"):
        parse_policy("gaussian_0.1")


@pytest.mark.filterwarnings("ignore:Constant")
def test_policies_act_as_described():
    """Each family's action relates to the expert's as documented, on real Meta-World observations."""
    import metaworld

    mt = metaworld.MT1("reach-v3", seed=0)
    env = mt.train_classes["reach-v3"]()  # no rendering here
    env.set_task(mt.train_tasks[0])
    obs, _ = env.reset()
    try:
        observations = [obs]
        for _ in range(6):
            obs, *_ = env.step(env.action_space.sample() * 0)
            observations.append(obs)
    finally:
        env.close()
    pol = {n: parse_policy(n) for n in ["expert", "slow_0.5", "bias_x0.3", "lag_3", "eps_1.0"]}
    for p in pol.values():
        p.reset("reach-v3", np.random.default_rng(0))
    out = {n: [p.act(o) for o in observations] for n, p in pol.items()}
    e = np.array(out["expert"])
    np.testing.assert_allclose(np.array(out["slow_0.5"])[:, :3], e[:, :3] * 0.5, atol=1e-6)
    np.testing.assert_allclose(np.array(out["bias_x0.3"])[:, 0], np.clip(e[:, 0] + 0.3, -1, 1), atol=1e-6)
    np.testing.assert_allclose(np.array(out["lag_3"])[3:], e[:-3], atol=1e-6)  # acts on obs 3 steps old
    assert np.abs(np.array(out["eps_1.0"]) - e).mean() > 0.2


def test_bad_task_and_config():
    with pytest.raises(ValueError, match="valid tasks: .*push-v3"):
        CollectConfig(tasks=["pushh-v3"], train_policies=["expert"])
    with pytest.raises(PolicyNameError, match="valid names"):
        CollectConfig(tasks=["push-v3"], train_policies=["expertt"])
    with pytest.raises(ValueError, match="both training and OOD"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], ood_policies=["expert"])


@pytest.mark.filterwarnings("ignore:Constant")
def test_action_repeat_holds_each_action_for_r_simulator_steps():
    """With action_repeat R, replaying each recorded action R times in a fresh env from the same seed
    reproduces the next recorded state and frame exactly, and the recorded reward is the sum of the R."""
    from whale_pl.data.metaworld import MetaWorldEnv, rollout

    R, T = 3, 6
    env = MetaWorldEnv("push-v3", 32, "corner2")
    try:
        ep = rollout(env, "noise_0.5", 11, T, action_repeat=R)
        assert ep.frames.shape == (T, 32, 32, 3) and env.env.curr_path_length == R * T
        assert ep.meta["action_repeat"] == R and ep.meta["control_hz"] == pytest.approx(80.0 / R)
        obs = env.reset(11)
        for t in range(T):
            np.testing.assert_array_equal(ep.state[t], obs.astype(np.float32))
            np.testing.assert_array_equal(ep.frames[t], env.render())
            total = 0.0
            for _ in range(R):
                obs, r, *_ = env.env.step(ep.actions[t])
                total += float(r)
            assert ep.rewards[t] == pytest.approx(total, rel=1e-6)
        # the policy decided once per R steps: the arm moved about R times as far as between 80 Hz frames
        one = rollout(env, "expert", 11, T, action_repeat=1)
        held = rollout(env, "expert", 11, T, action_repeat=R)
        move = lambda e: np.linalg.norm(np.diff(e.state[:, :3], axis=0), axis=1).mean()  # noqa: E731
        assert move(held) > 2 * move(one)
    finally:
        env.close()


def test_action_repeat_config_checks_and_dataset_identity(tiny_shards, tiny_config):
    import dataclasses

    with pytest.raises(ValueError, match=r"max_steps 200 x action_repeat 4 = 800 .* > 500"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], max_steps=200, action_repeat=4)
    with pytest.raises(ValueError, match="action_repeat must be >= 1"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], action_repeat=0)
    # R = 1 is left out of the stored identity (datasets collected before the option stay complete);
    # another R is a different dataset
    assert "action_repeat" not in tiny_config.data_json()
    other = dataclasses.replace(tiny_config, action_repeat=2)
    assert other.data_json()["action_repeat"] == 2
    assert dataset_status(other)[0] == "different"


def test_camera_names_and_size_limit_match_the_models():
    """CollectConfig checks cameras and size against constants; they are the real models' (no rendering here)."""
    import metaworld

    from whale_pl.data.metaworld import CAMERAS, MAX_SIZE

    for task in ("push-v3", "door-open-v3"):
        env = metaworld.ALL_V3_ENVIRONMENTS[task]()
        try:
            m = env.model
            assert tuple(m.camera(i).name for i in range(m.ncam)) == CAMERAS
            assert min(m.vis.global_.offwidth, m.vis.global_.offheight) == MAX_SIZE
        finally:
            env.close()
    with pytest.raises(ValueError, match="seed must be >= 0"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], seed=-1)
    with pytest.raises(ValueError, match=r"ood_policies must be a list of names, got \{'noise_1.0': 1\}"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], ood_policies={"noise_1.0": 1})
    with pytest.raises(ValueError, match="workers must be an integer, got True"):
        CollectConfig(tasks=["push-v3"], train_policies=["expert"], workers=True)
