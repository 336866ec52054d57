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


def test_token_change_counts_changes_undone_at_the_next_frame():
    tc = _load("token_change")
    # position 0 flickers 1 -> 2 -> 1 and then changes nothing; position 1 changes 1 -> 2 and stays
    ids = torch.tensor([[[1, 1], [2, 1], [1, 2], [1, 2]]])  # [N=1, T=4, S=2]
    st = tc.change_stats(ids, torch.ones(1, 4), (1, 2))
    # changes into frames 1 and 2 (the ones with a frame after them): three; one of them is undone
    assert st["share_of_changes_undone_next_frame"] == pytest.approx(1 / 3)
    assert st["p_change"] == pytest.approx(3 / 6)


def test_token_ngram_learns_a_deterministic_cycle_that_copying_always_misses():
    tn = _load("token_ngram")
    nbrs = tn.grid_neighbours(1, 2)
    assert nbrs == [[1], [0]]
    # position 0 cycles 0 -> 1 -> 2 -> 0 ...: copying is never right there, the id -> next-id table always is;
    # position 1 never changes, so both are right there
    ids_TS = torch.tensor([[t % 3, 5] for t in range(7)])
    clip = (ids_TS, [6] * 7)
    counts = tn.fit_counts([clip], nbrs)
    assert counts["id"][(0, 2)] == {0: 2}  # 2 -> 0 seen twice (t = 2, 5)
    r = tn.score(counts, [clip], nbrs, tn.ORDERS["id"], min_count=1)
    assert r["tokens"] == 12
    assert r["copy_acc"] == pytest.approx(6 / 12)
    assert r["acc"] == 1.0 and r["acc_minus_copy_pt"] == pytest.approx(50.0)
    assert r["changes_called"] == 6 and r["called_right"] == 1.0
    # a key never seen often enough backs off to copying
    r = tn.score(counts, [clip], nbrs, tn.ORDERS["id"], min_count=10)
    assert r["acc"] == pytest.approx(r["copy_acc"]) and r["changes_called"] == 0


def test_token_ngram_action_bins():
    tn = _load("token_ngram")
    assert tn.action_bin(torch.tensor([0.1, -0.1, 0.05])) == 6
    assert tn.action_bin(torch.tensor([0.1, -0.9, 0.3])) == 2  # y axis, negative
    assert tn.action_bin(torch.tensor([0.0, 0.1, 0.5])) == 5  # z axis, positive


def test_budget_bootstrap_interval_over_clips():
    """Equal clips give a zero-width interval at their value; clips that disagree widen it around the
    pooled figure; more clips of the same kind narrow it."""
    db = _load("dynamics_budget")
    assert db.bootstrap_ci([(2, 100)] * 20) == pytest.approx((2.0, 2.0))
    mixed = [(5, 100), (-3, 100)] * 10  # pooled +1 pt
    lo, hi = db.bootstrap_ci(mixed)
    assert lo < 1.0 < hi and lo > -3 and hi < 5
    lo4, hi4 = db.bootstrap_ci(mixed * 4)
    assert hi4 - lo4 < 0.7 * (hi - lo)


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
