"""Retracing-rollout uncertainty of imagined frames (docs/method.md, "Retracing-rollout").

To judge imagined frame o_{t+1}, predict it K ways: for k = 1..K, from the (stride-k) context
ending at o_{t-k+1}, with the retracing-action ā_k = compose(a_{t-k+1..t}). The model has been
trained on stride-k clips with composed actions (ClipDataModule ``frame_stride`` / batch
``stride``), so each of the K predictions is in-distribution for it. Composition follows the data's
:class:`~whale_pl.data.episode.ActionSpace`; model inputs are normalised actions, so composing a
normalised sequence un-normalises, composes and re-normalises exactly as the datamodule does for
stride-k clips (:class:`whale_pl.data.actions.ActionNormaliser`).

The K token distributions of a frame are scored by :func:`combine_predictions`, the rule the
deep-ensemble baseline (``rollout/ensemble.py``) shares:

- **feature disagreement**: each prediction's expected code vector per position,
  ``f_k = Σ_v p_k(v) e_v`` (``e_v`` the tokenizer's l2-normalised code vectors), and the total
  variance across predictions ``Σ_C Var_k f_k``, averaged over the frame's positions. With unit
  code vectors it lies in [0, 1].
- **predictive entropy**: entropy of the predictions' mixture ``H(mean_k p_k)`` per position, divided
  by ``log V`` so it lies in [0, 1], averaged over positions. (It contains the disagreement in
  distribution space plus the model's own aleatoric spread.)
- **score** (our choice): ``w · disagreement + (1 − w) · entropy``, ``w = 0.5`` by default. Both
  parts are reported so another combination can be formed later.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from einops import einsum

from whale_pl.data.actions import ActionError, ActionNormaliser, check_composable
from whale_pl.data.episode import ActionSpace

ZFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combine_predictions(
    probs_KBSV: torch.Tensor, codebook_VC: torch.Tensor, weight: float = 0.5
) -> dict[str, torch.Tensor]:
    """Uncertainty of B frames from K predictions each.

    ``probs_KBSV``: token probabilities, K predictions × B frames × S positions × V codes.
    ``codebook_VC``: code vectors (the tokenizer's embedding of each id).
    Returns ``disagreement_B``, ``entropy_B`` and ``score_B`` (float32).
    """
    if probs_KBSV.ndim != 4:
        raise ValueError(f"probs_KBSV must be [K, B, S, V], got shape {tuple(probs_KBSV.shape)}")
    K, _, _, V = probs_KBSV.shape
    if codebook_VC.shape[0] != V:
        raise ValueError(f"codebook has {codebook_VC.shape[0]} codes but the predictions have V={V}")
    if K < 2:
        raise ValueError(f"need at least 2 predictions of a frame to measure disagreement, got K={K}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    p = probs_KBSV.float()
    feats_KBSC = einsum(p, codebook_VC.float(), "k b s v, v c -> k b s c")
    disagreement_B = feats_KBSC.var(dim=0, unbiased=False).sum(-1).mean(-1)
    mix_BSV = p.mean(0)
    ent_BS = -(mix_BSV * mix_BSV.clamp_min(1e-12).log()).sum(-1) / math.log(V)
    entropy_B = ent_BS.mean(-1)
    return {
        "disagreement": disagreement_B,
        "entropy": entropy_B,
        "score": weight * disagreement_B + (1 - weight) * entropy_B,
    }


def retracing_actions(actions_raw_TA: np.ndarray, space: ActionSpace, k: int) -> np.ndarray:
    """Raw retracing-actions of stride k over a sequence: row t is compose(a_{t-k+1..t}) for
    t = k-1..T-1, so the result has T-k+1 rows (row j leads from frame j to frame j+k)."""
    check_composable(space)
    a = np.asarray(actions_raw_TA)
    if a.ndim != 2 or a.shape[1] != space.dim:
        raise ActionError(f"actions must be [T, {space.dim}] for {space.names}, got {a.shape}")
    if not 1 <= k <= a.shape[0]:
        raise ActionError(f"stride k={k} must be in [1, T={a.shape[0]}]")
    windows = np.lib.stride_tricks.sliding_window_view(a, k, axis=0)  # [T-k+1, A, k]
    return space.compose(np.swapaxes(windows, -1, -2))


def retracing_plan(t: int, K: int) -> list[tuple[int, int]]:
    """For imagined frame index t+1 (predicted from frame t), the (k, anchor) pairs: anchor frame
    t-k+1 for k = 1..K, keeping only anchors >= 0."""
    if K < 1:
        raise ActionError(f"K must be >= 1, got {K}")
    return [(k, t - k + 1) for k in range(1, K + 1) if t - k + 1 >= 0]


def strided_context(anchor: int, k: int, max_frames: int) -> list[int]:
    """Frame indices of a stride-k context ending at ``anchor``: ..., anchor-2k, anchor-k, anchor
    (at most ``max_frames``, none below 0), oldest first."""
    idx = list(range(anchor, -1, -k))[:max_frames]
    return idx[::-1]


def composed_action_table(actions_norm_BTA: torch.Tensor, normaliser: ActionNormaliser, K: int) -> list[torch.Tensor]:
    """``table[k-1][:, j]``: the normalised stride-k action leading from frame j to j+k,
    compose(a_j .. a_{j+k-1}), for k = 1..K (``table[k-1]`` has T-k+1 rows)."""
    a = actions_norm_BTA.detach().cpu().numpy()
    out = [actions_norm_BTA]
    for k in range(2, K + 1):
        if a.shape[1] < k:
            break
        win = np.lib.stride_tricks.sliding_window_view(a, k, axis=1)  # [B, T-k+1, A, k]
        composed = normaliser.compose_normalised(np.swapaxes(win, -1, -2))
        out.append(torch.as_tensor(composed, dtype=actions_norm_BTA.dtype, device=actions_norm_BTA.device))
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
        raise ActionError(f"retracing needs K >= 2 predictions per step, got K={K}")
    max_stride = getattr(model, "max_stride", K)
    if K > max_stride:
        raise ActionError(f"K={K} exceeds the strides the model was trained for (max_stride={max_stride})")
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
