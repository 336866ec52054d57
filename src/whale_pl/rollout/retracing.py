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

from collections.abc import Callable

import numpy as np
import torch

from whale_pl.data.episode import ActionSpace
from whale_pl.rollout.uncertainty import combine_predictions


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
    """The datamodule's action normalisation, for single and composed actions.

    ``base`` is the data's ``frame_stride`` (the model's clock): one model step composes ``base``
    recorded steps, so a model-step action is normalised with ``k = base`` and a retracing-action
    over K model steps with ``k = K * base``."""

    def __init__(self, space: ActionSpace, mean_A: np.ndarray | list, std_A: np.ndarray | list, base: int = 1) -> None:
        if int(base) < 1:
            raise RetracingError(f"base frame stride must be >= 1, got {base}")
        self.space, self.base = space, int(base)
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
        return cls(ActionSpace.from_json(data_spec["action_space"]), data_spec["action_mean"], data_spec["action_std"],
                   base=int(data_spec.get("frame_stride", 1)))

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
        """Normalised model-step actions [..., K, A] -> the normalised retracing-action [..., A]."""
        check_composable(self.space)
        a = np.asarray(actions_norm_KA)
        raw = self.denormalise(a, self.base)
        return self.normalise(self.space.compose(raw), a.shape[-2] * self.base)

    def normalise_held(self, raw_A: np.ndarray) -> np.ndarray:
        """Raw decisions [..., A], each held for one model step (``base`` recorded steps, as the
        simulator does with ``action_repeat``) -> model inputs: compose(a, .., a), normalised."""
        a = np.asarray(raw_A, dtype=np.float64)
        if self.base == 1:
            return self.normalise(a, 1)
        check_composable(self.space)
        held = np.repeat(a[..., None, :], self.base, axis=-2)
        return self.normalise(self.space.compose(held), self.base)


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


# --------------------------------------------------------------------------------------------
# retracing-rollout uncertainty of an imagined rollout
# --------------------------------------------------------------------------------------------
ZFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def composed_action_table(actions_norm_BTA: torch.Tensor, normaliser: ActionNormaliser, K: int) -> list[torch.Tensor]:
    """``table[k-1][:, j]``: the normalised stride-k action leading from frame j to j+k,
    compose(a_j .. a_{j+k-1}), for k = 1..K (``table[k-1]`` has T-k+1 rows)."""
    a = actions_norm_BTA.detach().cpu().numpy()
    out = [actions_norm_BTA]
    for k in range(2, K + 1):
        if a.shape[1] < k:
            break
        win = np.lib.stride_tricks.sliding_window_view(a, k, axis=1)  # [B, T-k+1, A, k]
        out.append(as_tensor(normaliser.compose_normalised(np.swapaxes(win, -1, -2)), actions_norm_BTA))
    return out


@torch.no_grad()
def retracing_predictions(
    model: "torch.nn.Module",
    ids_BNhw: torch.Tensor,
    table: list[torch.Tensor],
    n: int,
    K: int,
    z_fn: ZFn | None = None,
    max_context: int | None = None,
) -> list[torch.Tensor]:
    """The K token distributions ``probs_BhwV`` of frame n, one per anchor n-k (k = 1..K, anchors
    >= 0), each from the stride-k context ending at the anchor with the composed action.

    ``ids_BNhw`` holds frames 0..n-1 at least (real context and imagined frames); ``table`` comes
    from :func:`composed_action_table`; ``model`` has ``predict_next`` and ``max_frames``.
    """
    max_ctx = (model.max_frames - 1) if max_context is None else max_context
    out = []
    for k, anchor in retracing_plan(n - 1, K):
        if k > len(table):
            break
        idx = strided_context(anchor, k, max_ctx)
        ctx = ids_BNhw[:, idx]
        acts = table[k - 1][:, idx]
        z = None if z_fn is None else z_fn(ctx, acts)
        stride = torch.full((ctx.shape[0],), k, dtype=torch.long, device=ctx.device)
        out.append(model.predict_next(ctx, acts, z, stride)["probs_BhwV"])
    return out


@torch.no_grad()
def retracing_uncertainty(
    model: "torch.nn.Module",
    ids_BNhw: torch.Tensor,
    actions_norm_BTA: torch.Tensor,
    normaliser: ActionNormaliser,
    first: int,
    K: int = 3,
    codebook_VC: torch.Tensor | None = None,
    z_fn: ZFn | None = None,
    weight: float = 0.5,
    max_context: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-step retracing uncertainty of frames ``first .. N-1`` of a rollout ``ids_BNhw``.

    ``actions_norm_BTA[:, t]`` is the (normalised, single-step) action taken at frame t. Returns
    ``score_BH``, ``disagreement_BH``, ``entropy_BH`` and ``n_predictions_H`` (how many anchors
    each step had; a step with a single anchor has disagreement 0 by definition). Costs at most K
    ``predict_next`` passes per step.
    """
    check_composable(normaliser.space)
    if K < 2:
        raise RetracingError(f"retracing needs K >= 2 predictions per step, got K={K}")
    max_stride = getattr(model, "max_stride", K)
    if K > max_stride:
        raise RetracingError(f"K={K} exceeds the strides the model was trained for (max_stride={max_stride})")
    N = ids_BNhw.shape[1]
    V = model.codebook_size
    codes = torch.eye(V, device=ids_BNhw.device) if codebook_VC is None else codebook_VC
    table = composed_action_table(actions_norm_BTA, normaliser, K)
    parts: dict[str, list[torch.Tensor]] = {"score": [], "disagreement": [], "entropy": []}
    n_pred = []
    for n in range(first, N):
        preds = retracing_predictions(model, ids_BNhw, table, n, K, z_fn, max_context)
        n_pred.append(len(preds))
        probs_KBSV = torch.stack([p.flatten(1, 2) for p in preds])
        if len(preds) == 1:  # one anchor: nothing to disagree with
            probs_KBSV = torch.cat([probs_KBSV, probs_KBSV])
        u = combine_predictions(probs_KBSV, codes, weight)
        for key in parts:
            parts[key].append(u[key])
    res = {f"{k}_BH": torch.stack(v, 1) for k, v in parts.items()}
    res["n_predictions_H"] = torch.tensor(n_pred)
    return res
