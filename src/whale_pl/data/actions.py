"""The datamodule's action normalisation outside the loader, for evaluation and retracing: ``(a - k * mean) / std``
on every dim but the gripper (raw), ``a`` a raw action composed over ``k`` recorded steps."""

from __future__ import annotations

import numpy as np

from whale_pl.data.episode import ActionSpace


class ActionError(ValueError):
    """Actions that cannot be composed or normalised as asked (action space, shapes, strides)."""


def check_composable(space: ActionSpace) -> None:
    """Raise ActionError naming the dims when ``space`` has dims that do not compose over steps."""
    bad = space.uncomposable_dims
    if bad:
        raise ActionError(f"action space {space.names} cannot compose actions over several steps: dims "
                          f"{[space.names[i] for i in bad]} are neither summed (sum_dims={space.sum_dims}), rotations "
                          f"(rot_dims={space.rot_dims}) nor the gripper (gripper_index={space.gripper_index})")


class ActionNormaliser:
    """Normalise single and composed actions; ``base``: the data's ``frame_stride`` (a model step's k)."""

    def __init__(self, space: ActionSpace, mean_A: np.ndarray | list, std_A: np.ndarray | list, base: int = 1) -> None:
        if int(base) < 1:
            raise ActionError(f"base frame stride must be >= 1, got {base}")
        self.space, self.base = space, int(base)
        self.mean = np.asarray(mean_A, dtype=np.float64)
        self.std = np.asarray(std_A, dtype=np.float64)
        self.mask = space.normalised_mask

    @classmethod
    def from_data_spec(cls, data_spec: dict) -> "ActionNormaliser":
        """The normaliser of the data a ``data_spec`` describes (space, mean, std, frame_stride)."""
        return cls(ActionSpace.from_json(data_spec["action_space"]), data_spec["action_mean"], data_spec["action_std"],
                   base=int(data_spec.get("frame_stride", 1)))

    def normalise(self, raw: np.ndarray, k: int | np.ndarray = 1) -> np.ndarray:
        """Raw (composed over k steps) actions [..., A] -> model inputs."""
        return self._map(raw, k, lambda x, k_arr: (x - k_arr * self.mean) / self.std)

    def denormalise(self, norm: np.ndarray, k: int | np.ndarray = 1) -> np.ndarray:
        """Model inputs [..., A] -> the raw actions (composed over k steps) they stand for."""
        return self._map(norm, k, lambda x, k_arr: x * self.std + k_arr * self.mean)

    def _map(self, x: np.ndarray, k: int | np.ndarray, fn) -> np.ndarray:
        """``fn`` on every dim but the gripper (which stays as it is), in float64; float32 out."""
        out = np.asarray(x, dtype=np.float64).copy()
        y = fn(out, np.asarray(k, dtype=np.float64)[..., None])
        out[..., self.mask] = y[..., self.mask]
        return out.astype(np.float32)

    def compose_normalised(self, actions_norm_KA: np.ndarray) -> np.ndarray:
        """Normalised model-step actions [..., K, A] -> the normalised retracing-action [..., A]."""
        a = np.asarray(actions_norm_KA)
        raw = self.denormalise(a, self.base)
        return self.normalise(self.space.compose(raw), a.shape[-2] * self.base)

    def normalise_held(self, raw_A: np.ndarray) -> np.ndarray:
        """Raw decisions [..., A], each held for one model step (``base`` recorded steps) -> model inputs."""
        a = np.asarray(raw_A, dtype=np.float64)
        if self.base == 1:
            return self.normalise(a, 1)
        held = np.repeat(a[..., None, :], self.base, axis=-2)
        return self.normalise(self.space.compose(held), self.base)
