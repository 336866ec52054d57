"""Retracing-action composition against hand-computed cases."""

import numpy as np
import pytest

from whale_pl.data.episode import EEF7_ACTION_SPACE, METAWORLD_ACTION_SPACE, ActionSpace
from whale_pl.data.actions import ActionError, ActionNormaliser
from whale_pl.rollout.retracing import retracing_actions, retracing_plan, strided_context

MW = np.array([[0.1, 0.0, 0.2, -1.0], [0.3, -0.1, 0.0, 1.0], [0.0, 0.5, 0.0, 0.5]], dtype=np.float32)


def test_metaworld_xyz_sum_gripper_last():
    out = retracing_actions(MW, METAWORLD_ACTION_SPACE, 2)
    np.testing.assert_allclose(out, [[0.4, -0.1, 0.2, 1.0], [0.3, 0.4, 0.0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(retracing_actions(MW, METAWORLD_ACTION_SPACE, 3), [[0.4, 0.4, 0.2, 0.5]], atol=1e-6)
    np.testing.assert_array_equal(retracing_actions(MW, METAWORLD_ACTION_SPACE, 1), MW)


def test_normalised_composition_matches_datamodule_rule():
    norm = ActionNormaliser(METAWORLD_ACTION_SPACE, [0.1, 0.0, 0.0, 0.0], [0.5, 1.0, 2.0, 1.0])
    a_norm = norm.normalise(MW[:2])  # per-step inputs: ((0.1-0.1)/0.5, ...), gripper raw
    np.testing.assert_allclose(a_norm, [[0.0, 0.0, 0.1, -1.0], [0.4, -0.1, 0.0, 1.0]], atol=1e-6)
    # composed raw [0.4, -0.1, 0.2, 1] -> ((0.4 - 2*0.1)/0.5, -0.1/1, 0.2/2, 1)
    np.testing.assert_allclose(norm.compose_normalised(a_norm), [0.4, -0.1, 0.1, 1.0], atol=1e-6)


def test_base_stride_composes_model_steps_as_the_datamodule_does():
    """base 2 (data frame_stride 2): a model-step action is compose(2 recorded steps) normalised with
    k=2; composing two model steps equals the stride-4 rule on the 4 recorded steps; a held decision
    is the action repeated for 2 recorded steps."""
    mean, std = np.array([0.1, 0.0, 0.0, 0.0]), np.array([0.5, 1.0, 2.0, 1.0])
    rec = np.array([[0.1, 0.0, 0.2, -1.0], [0.3, -0.1, 0.0, 1.0], [0.0, 0.5, 0.0, 0.5], [0.2, 0.2, -0.4, 0.0]],
                   dtype=np.float32)
    norm = ActionNormaliser(METAWORLD_ACTION_SPACE, mean, std, base=2)
    step = np.stack([METAWORLD_ACTION_SPACE.compose(rec[:2]), METAWORLD_ACTION_SPACE.compose(rec[2:])])
    a_norm = norm.normalise(step, 2)
    np.testing.assert_allclose(a_norm[0], [(0.4 - 0.2) / 0.5, -0.1, 0.1, 1.0], atol=1e-6)
    raw4 = METAWORLD_ACTION_SPACE.compose(rec)  # [0.6, 0.6, -0.2, 0.0]
    want = np.concatenate([(raw4[:3] - 4 * mean[:3]) / std[:3], raw4[3:]])
    np.testing.assert_allclose(norm.compose_normalised(a_norm), want, atol=1e-6)
    held = norm.normalise_held(rec[1])
    np.testing.assert_allclose(held, [(0.6 - 0.2) / 0.5, -0.2, 0.0, 1.0], atol=1e-6)
    one = ActionNormaliser(METAWORLD_ACTION_SPACE, mean, std)  # base 1: a held decision is the action itself
    np.testing.assert_array_equal(one.normalise_held(rec[1]), one.normalise(rec[1]))
    with pytest.raises(ActionError, match="base"):
        ActionNormaliser(METAWORLD_ACTION_SPACE, mean, std, base=0)


def _rx(a):
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _ry(a):
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def _rz(a):
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_oxe_rotations_compose_as_rotations():
    # roll 90 deg, then yaw 90 deg: R = Rz(90) Rx(90), whose extrinsic xyz angles are (90, 0, 90)
    h = np.pi / 2  # (pitch stays 0: no gimbal lock)
    a = np.array([[0.1, 0, 0, h, 0, 0, 0.0], [0.2, 0, 0.3, 0, 0, h, 1.0]])
    out = retracing_actions(a, EEF7_ACTION_SPACE, 2)[0]
    np.testing.assert_allclose(out, [0.3, 0, 0.3, h, 0, h, 1.0], atol=1e-6)
    # yaw 30 deg, then pitch 40 deg: the composed angles must give the matrix Ry(40) Rz(30)
    y, p = np.deg2rad(30), np.deg2rad(40)
    b = np.zeros((2, 7))
    b[0, 5], b[1, 4] = y, p
    r, pi_, ya = retracing_actions(b, EEF7_ACTION_SPACE, 2)[0, 3:6]
    np.testing.assert_allclose(_rz(ya) @ _ry(pi_) @ _rx(r), _ry(p) @ _rz(y), atol=1e-6)
    # small angles add up
    small = np.zeros((3, 7))
    small[:, 3:6] = [[0.01, 0.02, -0.01]] * 3
    np.testing.assert_allclose(retracing_actions(small, EEF7_ACTION_SPACE, 3)[0, 3:6], [0.03, 0.06, -0.03], atol=1e-3)  # 2nd-order terms ~6e-4


def test_non_composing_space_is_a_clear_error():
    joint_space = ActionSpace(names=["q0", "q1", "gripper"], sum_dims=[], gripper_index=2)
    with pytest.raises(ActionError, match=r"\['q0', 'q1'\]"):
        retracing_actions(np.zeros((4, 3)), joint_space, 2)


def test_plan_and_strided_context():
    assert retracing_plan(5, 3) == [(1, 5), (2, 4), (3, 3)]
    assert retracing_plan(1, 3) == [(1, 1), (2, 0)]
    assert strided_context(7, 2, 3) == [3, 5, 7]
    assert strided_context(3, 2, 8) == [1, 3]
