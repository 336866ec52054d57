"""Value-estimation and AUROC figures against hand-computed examples."""

import math

import numpy as np
import pytest

from whale_pl.rollout.value_metrics import auroc, policy_figures, rank_corr


def value_figures(real, imag) -> dict[str, float]:
    """The figures of one set of policies, as floats."""
    return {k: float(v) for k, v in policy_figures(np.asarray(real, float), np.asarray(imag, float)).items()}


def test_value_figures_good_model_by_hand():
    real, imag = [0.0, 5.0, 10.0], [2.0, 4.0, 10.0]
    f = value_figures(real, imag)
    # range 10: normalised gaps 0.2, 0.1, 0.0 -> mean 0.1; signed (+0.2, -0.1, 0) -> bias 0.1/3
    assert f["value_gap"] == pytest.approx(0.1) and f["bias"] == pytest.approx(0.1 / 3)
    assert f["spearman"] == pytest.approx(1.0)
    # deviations (-5,0,5) and (-10/3,-4/3,14/3): cov 40, norms sqrt(50), sqrt(104/3)
    assert f["pearson"] == pytest.approx(40 / math.sqrt(50 * 104 / 3))
    assert f["regret_at_1"] == 0.0


def test_value_figures_bad_model_by_hand():
    real, imag = [0.0, 5.0, 10.0], [10.0, 0.0, 5.0]
    figs = value_figures(real, imag)
    assert figs["value_gap"] == pytest.approx((10 + 5 + 5) / 3 / 10)
    # ranks (1,2,3) vs (3,1,2): sum d^2 = 6 -> 1 - 6*6/(3*(9-1)) = -0.5
    assert figs["spearman"] == pytest.approx(-0.5)
    # the model picks policy 0, real value 0, best is 10 -> regret 1
    assert figs["regret_at_1"] == pytest.approx(1.0)


def test_value_gap_is_scale_free_and_offset_sensitive():
    real = [1.0, 2.0, 4.0]
    assert value_figures(real, real)["value_gap"] == 0.0
    f = value_figures([10 * r for r in real], [10 * r + 3 for r in real])
    assert f["value_gap"] == pytest.approx(3 / 30) and f["bias"] == pytest.approx(3 / 30)
    assert value_figures(real, [r - 3 for r in real])["bias"] == pytest.approx(-1.0)  # under-estimates: negative


def test_policy_figures_batched_and_with_a_given_scale():
    """Leading axes are batches, each row equal to the 1-D figures; ``scale`` replaces the real range;
    figures are NaN (not an error) where undefined."""
    rng = np.random.default_rng(0)
    real, imag = rng.normal(size=(4, 6)), rng.normal(size=(3, 4, 6))
    f = policy_figures(real, imag)
    for i in range(3):
        for j in range(4):
            one = value_figures(real[j], imag[i, j])
            for k, v in one.items():
                assert f[k][i, j] == pytest.approx(v), k
    g = policy_figures(real, imag, scale=2 * np.ptp(real, -1))
    assert np.allclose(g["value_gap"], f["value_gap"] / 2) and np.allclose(g["spearman"], f["spearman"])
    flat = policy_figures(np.ones(4), np.arange(4.0))
    assert all(math.isnan(v) for v in flat.values())


def test_rank_correlation_of_a_constant_side_is_undefined():
    assert math.isnan(rank_corr([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_auroc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)  # a tie counts half
    assert auroc([0.0, 1.0], [1, 0]) == 0.0
    assert math.isnan(auroc([0.0, 1.0], [1, 1]))
    batched = auroc(np.array([[0.1, 0.4, 0.35, 0.8], [0.0, 1.0, 2.0, 3.0]]), np.array([[0, 0, 1, 1], [1, 1, 0, 0]]))
    assert batched.tolist() == [0.75, 0.0]


def test_step_figures_by_hand():
    """Within a step index: bad = error above that step's median; pooled: above the overall median."""
    from whale_pl.rollout.value_metrics import step_stat

    err = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]])  # rows: rollouts, columns: step index
    q = step_stat(np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]]), err)
    assert q["auroc_per_step"].tolist() == [1.0, 0.0] and q["auroc_within"] == 0.5
    assert q["spearman_within"] == pytest.approx(0.0)  # +1 and -1
    # pooled: bad = the four errors of step 1 (all above 0.7); their scores 4,3,2,1 against 1,2,3,4
    assert q["auroc_pooled"] == pytest.approx(0.5)


def test_a_single_policy_has_a_gap_on_a_given_scale_but_no_ranking_figures():
    f = policy_figures(np.array([2.0]), np.array([3.0]), scale=4.0)
    assert f["value_gap"] == pytest.approx(0.25) and f["bias"] == pytest.approx(0.25)
    assert all(math.isnan(f[k]) for k in ("spearman", "pearson", "regret_at_1"))
