"""Value-estimation and uncertainty-quality figures against hand-computed examples."""

import math

import pytest

from whale_pl.rollout.value_metrics import (
    auroc,
    pearson,
    regret_at_1,
    spearman,
    uncertainty_quality,
    value_figures,
    value_gap,
)


def test_value_figures_good_model_by_hand():
    real, imag = [0.0, 5.0, 10.0], [2.0, 4.0, 10.0]
    # range 10: normalised gaps 0.2, 0.1, 0.0 -> mean 0.1
    assert value_gap(real, imag) == pytest.approx(0.1)
    assert spearman(real, imag) == pytest.approx(1.0)
    # deviations (-5,0,5) and (-10/3,-4/3,14/3): cov 40, norms sqrt(50), sqrt(104/3)
    assert pearson(real, imag) == pytest.approx(40 / math.sqrt(50 * 104 / 3))
    assert regret_at_1(real, imag) == 0.0


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
    assert value_gap(real, real) == 0.0
    assert value_gap([10 * r for r in real], [10 * r + 3 for r in real]) == pytest.approx(3 / 30)


def test_value_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="zero range"):
        value_gap([3.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        value_gap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        regret_at_1([1.0, float("nan")], [1.0, 2.0])
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_auroc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)  # a tie counts half
    assert auroc([0.0, 1.0], [1, 0]) == 0.0
    assert math.isnan(auroc([0.0, 1.0], [1, 1]))


def test_uncertainty_quality_by_hand():
    err = [0.1, 0.2, 0.3, 0.4]
    q = uncertainty_quality([1.0, 2.0, 3.0, 4.0], err)  # median 0.25: the last two are bad
    assert q["auroc"] == 1.0 and q["spearman"] == pytest.approx(1.0) and q["threshold"] == pytest.approx(0.25)
    q = uncertainty_quality([4.0, 3.0, 2.0, 1.0], err, threshold=0.15)
    assert q["auroc"] == 0.0 and q["spearman"] == pytest.approx(-1.0)
