"""Uncertainty of imagined frames (docs/method.md, "Retracing-rollout uncertainty"): K predictions of each frame,
by retracing (stride-k contexts, composed actions) or a deep ensemble, scored by :func:`combine_predictions`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from einops import einsum

from whale_pl.data.actions import ActionNormaliser, check_composable
from whale_pl.data.episode import ActionSpace

ZFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combine_predictions(probs_KBSV: torch.Tensor, codebook_VE: torch.Tensor,
                        weight: float = 0.5) -> dict[str, torch.Tensor]:
    """``disagreement``, ``entropy`` and ``score`` ([B] each) of K >= 2 token distributions of B frames (S positions,
    V codes) with the code vectors ``codebook_VE``."""
    V = probs_KBSV.shape[-1]
    p = probs_KBSV.float()
    feats_KBSC = einsum(p, codebook_VE.float(), "k b s v, v c -> k b s c")
    disagreement_B = feats_KBSC.var(dim=0, unbiased=False).sum(-1).mean(-1)
    mix_BSV = p.mean(0)
    entropy_B = (-(mix_BSV * mix_BSV.clamp_min(1e-12).log()).sum(-1) / math.log(V)).mean(-1)
    return {"disagreement": disagreement_B, "entropy": entropy_B,
            "score": weight * disagreement_B + (1 - weight) * entropy_B}


def retracing_actions(actions_raw_TA: np.ndarray, space: ActionSpace, k: int) -> np.ndarray:
    """Raw retracing-actions of stride k: row j is compose(a_j..a_{j+k-1}), from frame j to j+k (T-k+1 rows)."""
    check_composable(space)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(actions_raw_TA), k, axis=0)
    return space.compose(np.swapaxes(windows, -1, -2))


def retracing_plan(t: int, K: int) -> list[tuple[int, int]]:
    """The (k, anchor frame t-k+1) pairs predicting frame t+1, k = 1..K, anchors >= 0."""
    return [(k, t - k + 1) for k in range(1, K + 1) if t - k + 1 >= 0]


def strided_context(anchor: int, k: int, max_frames: int) -> list[int]:
    """Frame indices ..., anchor-2k, anchor-k, anchor of a stride-k context (at most ``max_frames``, >= 0)."""
    return list(range(anchor, -1, -k))[:max_frames][::-1]


def composed_action_table(actions_norm_BTA: torch.Tensor, normaliser: ActionNormaliser, K: int) -> list[torch.Tensor]:
    """``table[k-1][:, j]``: the normalised stride-k action compose(a_j .. a_{j+k-1}), k = 1..K (as far as T goes)."""
    a = actions_norm_BTA.detach().cpu().numpy()
    out = [actions_norm_BTA]
    for k in range(2, min(K, a.shape[1]) + 1):
        win = np.lib.stride_tricks.sliding_window_view(a, k, axis=1)  # [B, T-k+1, A, k]
        composed = normaliser.compose_normalised(np.swapaxes(win, -1, -2))
        out.append(torch.as_tensor(composed, dtype=actions_norm_BTA.dtype, device=actions_norm_BTA.device))
    return out


@torch.no_grad()
def retracing_uncertainty(model: torch.nn.Module, ids_BThw: torch.Tensor, actions_norm_BTA: torch.Tensor,
                          normaliser: ActionNormaliser, first: int, K: int, codebook_VE: torch.Tensor, z_fn: ZFn | None,
                          weight: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-step retracing uncertainty of frames ``first .. N-1`` of a rollout (``actions_norm_BTA[:, t]`` taken at
    frame t): ``score_BT``, ``disagreement_BT``, ``entropy_BT``, ``n_predictions_T`` (anchors; one: disagreement 0)."""
    table = composed_action_table(actions_norm_BTA, normaliser, K)
    scored, n_pred = [], []
    for n in range(first, ids_BThw.shape[1]):
        preds = []
        for k, anchor in retracing_plan(n - 1, min(K, len(table))):
            idx = strided_context(anchor, k, model.max_frames - 1)
            ctx, acts = ids_BThw[:, idx], table[k - 1][:, idx]
            stride = torch.full((ctx.shape[0],), k, dtype=torch.long, device=ctx.device)
            z = None if z_fn is None else z_fn(ctx, acts)
            preds.append(model.predict_next(ctx, acts, z, stride)["probs_BhwV"].flatten(1, 2))
        n_pred.append(len(preds))
        scored.append(combine_predictions(torch.stack(preds * 2 if len(preds) == 1 else preds), codebook_VE, weight))
    return {**_per_step(scored), "n_predictions_T": torch.tensor(n_pred)}


@torch.no_grad()
def ensemble_uncertainty(models: Sequence[torch.nn.Module], ids_BThw: torch.Tensor, actions_norm_BTA: torch.Tensor,
                         first: int, codebook_VE: torch.Tensor, z_fns: Sequence[ZFn | None],
                         weight: float = 0.5) -> dict[str, torch.Tensor]:
    """The ensemble's ``score_BT``, ... of frames ``first .. N-1``: >= 2 members predict frame n from frames < n."""
    scored = []
    for n in range(first, ids_BThw.shape[1]):
        preds = []
        for m, z_fn in zip(models, z_fns):
            lo = max(0, n - (m.max_frames - 1))
            ctx, acts = ids_BThw[:, lo:n], actions_norm_BTA[:, lo:n]
            z = None if z_fn is None else z_fn(ctx, acts)
            preds.append(m.predict_next(ctx, acts, z)["probs_BhwV"].flatten(1, 2))
        scored.append(combine_predictions(torch.stack(preds), codebook_VE, weight))
    return _per_step(scored)


def _per_step(scored: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``<part>_BT``: the frames' :func:`combine_predictions` parts, stacked along time."""
    return {f"{k}_BT": torch.stack([u[k] for u in scored], 1) for k in scored[0]}
