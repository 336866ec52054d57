"""The demo dataset config (stages/demo/data.yaml) collects and makes a meaningful train/OOD split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_dataset_returns_span_near_expert_to_poor():
    from whale_pl.data.metaworld import CollectConfig, ensure_collected

    os.chdir(ROOT)
    cfg = CollectConfig.from_yaml("stages/demo/data.yaml")
    m = ensure_collected(cfg)  # collects into data_shards/metaworld/demo unless it is complete (~1.5-3 min)
    assert {k: v["episodes"] for k, v in m["splits"].items()} == {"train": 96, "val": 24, "ood": 42}
    assert m["families"] == ["bias", "eps", "expert", "goal", "lag", "mix", "noise", "pause", "sine", "slow"]
    r = {k: v["return_mean"] for k, v in m["policies"].items()}
    sr = {k: v["success_rate"] for k, v in m["policies"].items()}
    for group in (cfg.train_policies, cfg.ood_policies):
        # each group holds near-expert and poor policies: returns differ >= 2.5x, success from >= 0.6 to <= 0.1
        assert max(r[p] for p in group) > 2.5 * min(r[p] for p in group), r
        assert max(sr[p] for p in group) >= 0.6 and min(sr[p] for p in group) <= 0.1, sr
    assert sr["expert"] > 0.7 and sr["slow_0.25"] < 0.2
