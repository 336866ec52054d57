"""The uncertainty combination (feature disagreement + predictive entropy) by hand."""

import math

import pytest
import torch

from whale_pl.rollout.retracing import combine_predictions

CODES = torch.eye(2)


def test_two_confident_disagreeing_predictions():
    probs = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # K=2, B=1, S=1, V=2
    u = combine_predictions(probs, CODES)
    # features (1,0) and (0,1): variance 0.25 per dim, total 0.5; mixture (.5,.5): entropy log2/log2
    assert u["disagreement"].item() == pytest.approx(0.5)
    assert u["entropy"].item() == pytest.approx(1.0)
    assert u["score"].item() == pytest.approx(0.75)


def test_agreeing_predictions_and_parts():
    probs = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[1.0, 0.0], [0.5, 0.5]]]])  # S=2
    u = combine_predictions(probs, CODES, weight=0.25)
    assert u["disagreement"].item() == pytest.approx(0.0)
    assert u["entropy"].item() == pytest.approx(0.5)  # positions: 0 and 1
    assert u["score"].item() == pytest.approx(0.75 * 0.5)


def test_uniform_predictions_have_full_entropy_at_every_position():
    assert math.isclose(combine_predictions(torch.ones(2, 3, 4, 2) / 2, CODES)["entropy"][2].item(), 1.0, rel_tol=1e-6)
