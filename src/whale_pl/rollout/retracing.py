"""Retracing-actions and retracing-rollout uncertainty (METHOD.md, "Retracing-rollout").

To judge imagined frame o_{t+1}, predict it K ways: for k = 1..K, from the (stride-k) context
ending at o_{t-k+1}, with the retracing-action ā_k = compose(a_{t-k+1..t}). The model has been
trained on stride-k clips with composed actions (ClipDataModule ``frame_stride`` / batch
``stride``), so each of the K predictions is in-distribution for it. The K token distributions
are scored by :func:`whale_pl.rollout.uncertainty.combine_predictions` (feature disagreement +
predictive entropy).

Composition follows the data's :class:`~whale_pl.data.episode.ActionSpace` (``compose``); model
inputs are normalised actions, so composing a normalised sequence un-normalises, composes and
re-normalises exactly as the datamodule does for stride-k clips:
``(compose(raw) - k * mean) / std`` on normalised dims, the gripper raw.
"""

from __future__ import annotations

import numpy as np
import torch

from whale_pl.data.episode import ActionSpace


class RetracingError(ValueError):
    """The action space or the request cannot give retracing-actions."""


def check_composable(space: ActionSpace) -> None:
    """Raise RetracingError naming the dims when ``space`` has dims that do not compose."""
    bad = space.uncomposable_dims
    if bad:
        raise RetracingError(
            f"action space {space.names} cannot give retracing-actions: dims "
            f"{[space.names[i] for i in bad]} are neither summed (sum_dims={space.sum_dims}), rotations "
            f"(rot_dims={space.rot_dims}) nor the gripper (gripper_index={space.gripper_index})"
        )


def retracing_actions(actions_raw_TA: np.ndarray, space: ActionSpace, k: int) -> np.ndarray:
    """Raw retracing-actions of stride k over a sequence: row t is compose(a_{t-k+1..t}) for
    t = k-1..T-1, so the result has T-k+1 rows (row j leads from frame j to frame j+k)."""
    check_composable(space)
    a = np.asarray(actions_raw_TA)
    if a.ndim != 2 or a.shape[1] != space.dim:
        raise RetracingError(f"actions must be [T, {space.dim}] for {space.names}, got {a.shape}")
    if not 1 <= k <= a.shape[0]:
        raise RetracingError(f"stride k={k} must be in [1, T={a.shape[0]}]")
    windows = np.lib.stride_tricks.sliding_window_view(a, k, axis=0)  # [T-k+1, A, k]
    return space.compose(np.swapaxes(windows, -1, -2))


class ActionNormaliser:
    """The datamodule's action normalisation, for single and composed actions."""

    def __init__(self, space: ActionSpace, mean_A: np.ndarray | list, std_A: np.ndarray | list) -> None:
        self.space = space
        self.mean = np.asarray(mean_A, dtype=np.float64)
        self.std = np.asarray(std_A, dtype=np.float64)
        if self.mean.shape != (space.dim,) or self.std.shape != (space.dim,):
            raise RetracingError(
                f"action mean {self.mean.shape} / std {self.std.shape} do not match the {space.dim} "
                f"dims of {space.names}"
            )
        self.mask = space.normalised_mask

    @classmethod
    def from_data_spec(cls, data_spec: dict) -> "ActionNormaliser":
        for key in ("action_space", "action_mean", "action_std"):
            if key not in data_spec:
                raise RetracingError(f"data_spec lacks '{key}' (has {sorted(data_spec)})")
        return cls(ActionSpace.from_json(data_spec["action_space"]), data_spec["action_mean"], data_spec["action_std"])

    def normalise(self, raw: np.ndarray, k: int | np.ndarray = 1) -> np.ndarray:
        """Raw (composed over k steps) actions [..., A] -> model inputs."""
        k_arr = np.asarray(k, dtype=np.float64)[..., None]
        out = np.asarray(raw, dtype=np.float64).copy()
        norm = (out - k_arr * self.mean) / self.std
        out[..., self.mask] = norm[..., self.mask]
        return out.astype(np.float32)

    def denormalise(self, norm: np.ndarray, k: int | np.ndarray = 1) -> np.ndarray:
        k_arr = np.asarray(k, dtype=np.float64)[..., None]
        out = np.asarray(norm, dtype=np.float64).copy()
        raw = out * self.std + k_arr * self.mean
        out[..., self.mask] = raw[..., self.mask]
        return out.astype(np.float32)

    def compose_normalised(self, actions_norm_KA: np.ndarray) -> np.ndarray:
        """Normalised single-step actions [..., K, A] -> the normalised retracing-action [..., A]."""
        check_composable(self.space)
        a = np.asarray(actions_norm_KA)
        raw = self.denormalise(a, 1)
        return self.normalise(self.space.compose(raw), a.shape[-2])


def retracing_plan(t: int, K: int) -> list[tuple[int, int]]:
    """For imagined frame index t+1 (predicted from frame t), the (k, anchor) pairs: anchor frame
    t-k+1 for k = 1..K, keeping only anchors >= 0."""
    if K < 1:
        raise RetracingError(f"K must be >= 1, got {K}")
    return [(k, t - k + 1) for k in range(1, K + 1) if t - k + 1 >= 0]


def strided_context(anchor: int, k: int, max_frames: int) -> list[int]:
    """Frame indices of a stride-k context ending at ``anchor``: ..., anchor-2k, anchor-k, anchor
    (at most ``max_frames``, none below 0), oldest first."""
    idx = list(range(anchor, -1, -k))[:max_frames]
    return idx[::-1]


def as_tensor(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)
