"""The experiment's statistics on synthetic data with known answers: paired bootstrap intervals of on − off,
AUROC intervals against chance within and across step indices, and verdicts that never say more than the
intervals do (undefined when a figure is)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from whale_pl.rollout.value_metrics import interval, uncertainty_intervals, value_intervals, verdict

T, P, K, S = 3, 6, 5, 3


def _returns(rng, bias_on: float, bias_off: float, noise: float = 0.3):
    """Real returns [T, P, K] and imagined ones [S, T, P, K] shifted by ``bias`` x the task's real range."""
    real = rng.normal(size=(T, P, K)) + 2.0 * np.arange(P)[None, :, None]
    scale = np.ptp(real.mean(-1), -1)[None, :, None, None]
    on, off = (real[None] + b * scale + noise * rng.normal(size=(S, T, P, K)) for b in (bias_on, bias_off))
    return real, on, off


def test_paired_bootstrap_covers_a_known_difference_and_excludes_zero_when_large():
    real, on, off = _returns(np.random.default_rng(0), 0.10, 0.0)
    r = value_intervals(real, on, off, n_boot=1000)["bias"]
    lo, hi = r["diff_ci"]
    assert lo <= 0.10 <= hi and lo > 0  # covers the true on − off bias, excludes zero
    assert r["verdict"] == "higher with conditioning"
    real, on, off = _returns(np.random.default_rng(1), 0.0, 0.10)
    assert value_intervals(real, on, off, n_boot=1000)["bias"]["verdict"] == "lower with conditioning"


def test_paired_bootstrap_coverage_of_the_true_difference():
    """Over independent synthetic experiments the 95 % interval of the bias difference covers the truth
    in most of them (a crude check of calibration, not a test of exact 95 %)."""
    hits = 0
    for seed in range(20):
        real, on, off = _returns(np.random.default_rng(100 + seed), 0.05, 0.0, noise=1.0)
        lo, hi = value_intervals(real, on, off, n_boot=400, seed=seed)["bias"]["diff_ci"]
        hits += lo <= 0.05 <= hi
    assert hits >= 16


def test_paired_bootstrap_includes_zero_for_equal_models():
    real, on, off = _returns(np.random.default_rng(2), 0.0, 0.0)
    for fig, r in value_intervals(real, on, off, n_boot=1000).items():
        if fig != "regret_at_1":  # both pick the best policy every time here: [0, 0]
            assert r["diff_ci"][0] < 0 < r["diff_ci"][1], fig
        assert r["verdict"] == "not distinguishable at this scale", fig


def test_verdict_is_undefined_when_a_figure_is():
    assert verdict(float("nan"), -1.0, 1.0, "higher", "lower") == "undefined"
    assert verdict(-0.5, float("nan"), float("nan"), "higher", "lower") == "undefined"
    assert verdict(float("nan"), 0.4, 0.6, "better", "worse", 0.5) == "undefined"
    real = np.ones((T, P, K))  # equal real returns: no range to normalise by
    rng = np.random.default_rng(3)
    res = value_intervals(real, rng.normal(size=(S, T, P, K)), rng.normal(size=(S, T, P, K)), n_boot=100)
    for fig in ("value_gap", "bias", "spearman", "pearson", "regret_at_1"):
        assert math.isnan(res[fig]["on"]) and res[fig]["verdict"] == "undefined"
    assert interval(np.array([np.nan] * 6 + [1.0] * 4)) == [pytest.approx(float("nan"), nan_ok=True)] * 2


def test_one_seed_has_intervals_too():
    real, on, off = _returns(np.random.default_rng(4), 0.2, 0.0)
    r = value_intervals(real, on[:1], off[:1], n_boot=200)["value_gap"]
    assert r["on_ci"][0] <= r["on"] <= r["on_ci"][1] and r["diff_ci"][0] <= r["diff"] <= r["diff_ci"][1]


def _steps(rng, N: int = 120, H: int = 8):
    """Per-step errors that grow with the step index, a score that tracks them within a step, noise."""
    err = rng.random((N, H)) * np.arange(1, H + 1)
    return err, err + 0.3 * rng.random((N, H)) * np.arange(1, H + 1), rng.random((N, H))


def test_auroc_within_a_step_index_beside_the_step_index_and_chance():
    err, good, noise = _steps(np.random.default_rng(5))
    u = uncertainty_intervals({"retracing": good, "ensemble": noise}, err, n_boot=300)
    r, e, s = (u["scores"][k] for k in ("retracing", "ensemble", "step index"))
    assert r["verdict_within"] == "better than chance" and r["auroc_within_ci"][0] > 0.5
    assert e["verdict_within"] == "no better than chance"
    assert e["auroc_within_ci"][0] <= 0.5 <= e["auroc_within_ci"][1]
    assert s["auroc_within"] == 0.5 and s["auroc_pooled"] > 0.6  # pooled, the step index alone scores well
    assert len(r["auroc_per_step"]) == err.shape[1] == len(r["auroc_per_step_ci"])
    assert u["differences"]["retracing - ensemble"]["verdict"] == "retracing higher"


def test_uncertainty_claim_never_reproduces_on_undefined_or_chance_figures():
    """The old report said "reproduces" when both AUROCs were undefined, or both at or below chance."""
    from whale_pl.experiment import uncertainty_claim

    err, good, noise = _steps(np.random.default_rng(6))
    undefined = uncertainty_intervals({"retracing": good, "ensemble": noise}, np.ones_like(err), n_boot=100)
    assert uncertainty_claim(undefined).startswith("undefined")
    chance = uncertainty_intervals({"retracing": noise, "ensemble": 1.0 - err}, err, n_boot=100)
    assert chance["scores"]["ensemble"]["verdict_within"] == "worse than chance"
    assert uncertainty_claim(chance).startswith("not supported")
    ok = uncertainty_intervals({"retracing": good, "ensemble": good + 0.01 * noise}, err, n_boot=100)
    assert uncertainty_claim(ok).startswith("consistent with the claim")
    behind = uncertainty_intervals({"retracing": err + 3 * noise, "ensemble": good}, err, n_boot=100)
    assert uncertainty_claim(behind).startswith("not supported")
