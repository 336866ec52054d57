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
    assert {k: v["episodes"] for k, v in m["splits"].items()} == {"train": 96, "val": 24, "ood": 36}
    assert m["families"] == ["bias", "eps", "expert", "lag", "mix", "noise", "slow"]
    r = {k: v["return_mean"] for k, v in m["policies"].items()}
    train = [r[p] for p in cfg.train_policies]
    ood = [r[p] for p in cfg.ood_policies]
    assert max(train) > 3 * min(train), r
    # held-out policies range from near-expert to poor
    assert max(ood) > 0.7 * max(train) and min(ood) < 0.35 * max(train), r
    assert m["policies"]["expert"]["success_rate"] > 0.7 and m["policies"]["slow_0.25"]["success_rate"] < 0.2
