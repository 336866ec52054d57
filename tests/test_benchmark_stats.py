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
