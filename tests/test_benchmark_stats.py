"""The statistics benchmarks print, on inputs whose answer is known by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_behavior_ceiling_state_inputs_standardise_with_training_statistics_and_name_missing_states():
    bc = _load("behavior_ceiling")
    rng = np.random.default_rng(0)
    ep = lambda shift: SimpleNamespace(state=rng.normal(shift, 2.0, (50, 3)), meta={"episode_id": "e"})  # noqa: E731
    eps = {"train": [ep(1.0), ep(1.0)], "val": [ep(5.0)]}
    x = bc.state_inputs(eps)
    tr = torch.cat(x["train"])
    assert torch.allclose(tr.mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(tr.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert (x["val"][0].mean(0) > 1.0).all()  # val standardised with the training statistics, not its own
    eps["val"].append(SimpleNamespace(state=None, meta={"episode_id": "task/policy/val/3"}))
    with pytest.raises(ValueError, match="task/policy/val/3.*no low-dimensional state"):
        bc.state_inputs(eps)


def test_behavior_ceiling_feature_columns_name_every_column_of_the_hand_features():
    """--features selects column groups by name: the names line up with what causal_features computes."""
    bc = _load("behavior_ceiling")
    rng = np.random.default_rng(0)
    raw = rng.uniform(-1, 1, (20, 4))
    a = 2.0 * raw + 0.5  # "normalised" actions: an affine map of the raw ones
    for expert in (None, rng.uniform(-1, 1, (20, 4))):
        x = bc.causal_features(a, raw, expert)
        cols = bc.feature_columns(4, expert=expert is not None)
        assert len(cols) == x.shape[1]
        np.testing.assert_allclose(x[:, cols == "a_t"], a)  # the current action
        np.testing.assert_allclose(x[-1, cols == "a"], a.mean(0))  # running mean over the whole clip
        np.testing.assert_allclose(x[-1, cols == "std"], a.std(0), atol=1e-9)
        np.testing.assert_allclose(x[-1, cols == "absda"], np.abs(np.diff(a, axis=0)).sum(0) / 20)  # 0 at t = 0
        assert set(cols) == set(bc.FEATURES) | ({"expert"} if expert is not None else set())
        # running histograms: the last row is the share of the clip's changes (from t = 1) / |a| in each bin, per dim
        K = len(bc.CHANGE_EDGES) + 1
        d_bins = np.searchsorted(bc.CHANGE_EDGES, np.diff(a, axis=0), side="left")
        want = np.stack([np.bincount(d_bins[:, j], minlength=K) / 19 for j in range(4)]).ravel()
        np.testing.assert_allclose(x[-1, cols == "dhist"], want)
        assert np.allclose(x[:, cols == "ahist"].reshape(20, 4, -1).sum(-1), 1.0)
        d = np.diff(a, axis=0)
        np.testing.assert_allclose(x[-1, cols == "turn"], (d[1:] * d[:-1]).sum(0) / 20)  # 0 at t <= 1
        np.testing.assert_allclose(x[-1, cols == "rev"], (d[1:] * d[:-1] < 0).sum(0) / 20)


def test_change_histogram_nll_orders_the_references():
    """Two policies whose changes differ (jitter vs constant): knowing the policy beats one shared histogram, and each
    val episode's own histogram is the floor; with identity normalisation the values are exact counts."""
    from types import SimpleNamespace

    bc = _load("behavior_ceiling")
    rng = np.random.default_rng(0)
    ident = SimpleNamespace(normalise=lambda a: a)

    def ep(name, fam):
        a = rng.normal(0, 1, (30, 2)) if name == "jitter" else np.zeros((30, 2))
        return SimpleNamespace(actions=a, meta={"policy": {"name": name, "family": fam}})

    train = [ep("jitter", "noise") for _ in range(3)] + [ep("still", "expert") for _ in range(3)]
    val = [ep("jitter", "noise"), ep("still", "expert")]
    ref = bc.change_histogram_nll(train, val, ident)
    assert ref["own episode"] <= ref["per policy"] + 0.1 < ref["one histogram"]
    assert ref["per family"] == ref["per policy"]  # one policy per family here
    # the still episode's changes all fall in the bin holding 0: per policy, p = (3 * 29 + 0.5) / (3 * 29 + 0.5 * K)
    K = len(bc.CHANGE_EDGES) + 1
    still = -2 * np.log((87 + 0.5) / (87 + 0.5 * K))
    assert np.isclose(bc.change_histogram_nll(train, val[1:], ident)["per policy"], still)


def test_behavior_family_value_conditions_and_clips_carry_the_labels_they_name():
    fv = _load("behavior_family_value")
    y = torch.tensor([[2, 0], [0, 3]])  # (family, policy) of two clips
    assert torch.equal(fv.condition(y, "none", 3, 4), torch.zeros(2, 7))
    fam = fv.condition(y, "family", 3, 4)
    assert fam[0].nonzero().flatten().tolist() == [2] and fam[1].nonzero().flatten().tolist() == [0]
    pol = fv.condition(y, "policy", 3, 4)
    assert pol[0].nonzero().flatten().tolist() == [3] and pol[1].nonzero().flatten().tolist() == [6]
    # clips: every start of every episode, in order, with that episode's labels and the right steps
    codes = torch.arange(10.0)[:, None, None, None].expand(10, 1, 1, 2)
    data = [(codes, torch.arange(10.0)[:, None], (1, 5)), (codes + 100, torch.arange(10.0)[:, None] + 100, (0, 2))]
    c, a, lab = fv.clips(data, 4, [[0, 6], [3]])
    assert c.shape == (3, 4, 1, 1, 2) and a[:, :, 0].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [103, 104, 105, 106]]
    assert lab.tolist() == [[1, 5], [1, 5], [0, 2]]


def test_behavior_probe_family_shares_by_policy():
    bp = _load("behavior_probe")
    # episodes 0, 1: policy "b" (points predicted 0, 0, 1 / 1); episode 2: policy "a" (points predicted 2, 2)
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    ep = torch.tensor([0, 0, 0, 1, 2, 2])
    shares = bp.family_shares_by_policy(pred, ep, ["b", "b", "a"], n_families=3)
    assert list(shares) == ["a", "b"]
    assert shares["a"] == [0.0, 0.0, 1.0]
    assert shares["b"] == pytest.approx([0.5, 0.5, 0.0])


def test_behavior_probe_layout_readout_finds_task_and_state_carried_by_z():
    bp = _load("behavior_probe")
    rng = np.random.default_rng(0)

    def episodes(n):
        out = []
        for i in range(n):
            st = np.zeros((3, 5), np.float32)
            st[0, 1] = rng.normal()  # dim 1 varies across episodes; the rest is constant
            out.append(SimpleNamespace(meta={"task": ["a", "b"][i % 2]}, state=st))
        return out

    tr, va = episodes(40), episodes(20)
    ep_tr, ep_va = torch.arange(40).repeat_interleave(3), torch.arange(20).repeat_interleave(3)

    def z_of(eps, ep):  # z = (task, state dim 1, noise): both readable
        return torch.tensor([[float(eps[i].meta["task"] == "b") * 4, eps[i].state[0, 1], rng.normal() * 0.1]
                             for i in ep.tolist()], dtype=torch.float32)

    acc, r2 = bp.layout_readout(z_of(tr, ep_tr), ep_tr, tr, z_of(va, ep_va), ep_va, va)
    assert acc == 1.0 and list(r2) == [1] and r2[1] > 0.95
    # z that holds neither: chance-level task accuracy, R^2 near 0
    noise = lambda n: torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32))
    acc, r2 = bp.layout_readout(noise(120), ep_tr, tr, noise(60), ep_va, va)
    assert acc < 0.75 and r2[1] < 0.2


def test_behavior_probe_stats_readout_reads_statistics_a_linear_z_holds():
    """action_stats are the clip moments they name; when z is a linear image of them, the ridge map recovers
    them (R^2 ~ 1) and the family probe on z does as well as the one on the statistics."""
    bp = _load("behavior_probe")
    a = torch.tensor([[[0.0], [2.0], [2.0], [4.0]]])  # one clip, A = 1
    assert bp.action_stats(a).tolist() == [[2.0, 6.0, pytest.approx(2 ** 0.5), 4 / 3, 8 / 3]]
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    s = torch.randn(120, 5, generator=g, dtype=torch.float64) + 3.0 * torch.nn.functional.one_hot(y, 5)
    z = s @ torch.randn(5, 8, generator=g, dtype=torch.float64)
    r2, acc = bp.stats_readout(z[:90], s[:90], y[:90], z[90:], s[90:], y[90:], n_classes=3)
    assert (r2 > 0.99).all()
    assert acc["statistics"] > 0.8 and abs(acc["z"] - acc["statistics"]) < 0.1


def test_behavior_probe_episode_breakdown_names_each_episode_and_its_confusions():
    bp = _load("behavior_probe")
    # episode 0 (family 1): points predicted 1, 1, 2, 1 -> 0.75 right, then family 2; episode 3 (family 0): all 2
    pred = torch.tensor([1, 1, 2, 1, 2, 2])
    y = torch.tensor([1, 1, 1, 1, 0, 0])
    ep = torch.tensor([0, 0, 0, 0, 3, 3])
    rows = bp.episode_breakdown(pred, y, ep, ["push a", "x", "y", "door b"], ["f0", "f1", "f2"])
    assert rows[0][0] == "push a" and rows[0][1] == pytest.approx(0.75)
    assert rows[0][2] == [("f1", 0.75), ("f2", 0.25)]
    assert rows[1] == ("door b", 0.0, [("f2", 1.0)])


def test_behavior_supervised_keeps_the_first_episodes_per_policy_and_learns_the_family(one_thread):
    """``behavior_supervised``: ``--per-policy`` keeps each (task, policy) group's first N training episodes by the index
    in their id (a bad id is named); trained with the labels, the prior's z_t tells a jittery family from a smooth one."""
    bs = _load("behavior_supervised")

    class Ep(SimpleNamespace):
        def __len__(self):
            return len(self.actions)

    rng = np.random.default_rng(0)
    eps = []
    for fam, scale in (("noise", 1.0), ("expert", 0.05)):
        for i in range(6):
            a = np.cumsum(rng.normal(0, 0.05, (24, 4)), 0) + rng.normal(0, scale, (24, 4))
            eps.append(Ep(actions=a.astype(np.float32), meta={"episode_id": f"push-v3/{fam}_x/train/{i}",
                                                             "policy": {"family": fam}}))
    norm = SimpleNamespace(normalise=lambda a: a)
    a_all, y_all = bs.split_tensors(eps, ["expert", "noise"], norm, 24)
    a4, y4 = bs.split_tensors(eps, ["expert", "noise"], norm, 24, per_policy=4)
    assert a_all.shape == (12, 24, 4) and a4.shape == (8, 24, 4) and y4.tolist() == [1] * 4 + [0] * 4
    with pytest.raises(ValueError, match="fewer than clip_len=30"):
        bs.split_tensors(eps, ["expert", "noise"], norm, 30)
    with pytest.raises(ValueError, match="episode_id 'odd'"):
        bs.episode_index(Ep(actions=a_all[0], meta={"episode_id": "odd"}))
    model, cls = bs.train_supervised(a4, y4, 2, z_dim=4, steps=60, t_min=4, seed=0, batch=8, lr=3e-3)
    with torch.no_grad():
        pred = cls(bs.prior_z(model, a_all)[:, 4:]).argmax(-1)
    assert (pred == y_all[:, None]).double().mean().item() > 0.9  # the held-out episodes 4, 5 too
    stats = dict(encoder_stats=["moments", "turns", "std"])  # --encoder-stats: the z head also reads them
    model, cls = bs.train_supervised(a4, y4, 2, z_dim=4, steps=60, t_min=4, seed=0, batch=8, lr=3e-3, stats=stats)
    assert model.stat_groups == ("moments", "turns", "std")
    with torch.no_grad():
        pred = cls(bs.prior_z(model, a_all)[:, 4:]).argmax(-1)
    assert (pred == y_all[:, None]).double().mean().item() > 0.9
