"""The deep-ensemble baseline: N dynamics models of different seeds predict each imagined frame from the same
context, scored by the retracing rule (:func:`whale_pl.rollout.retracing.combine_predictions`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from whale_pl.rollout.retracing import ZFn, combine_predictions


@torch.no_grad()
def ensemble_uncertainty(models: Sequence[torch.nn.Module], ids_BThw: torch.Tensor, actions_norm_BTA: torch.Tensor,
                         first: int, codebook_VE: torch.Tensor, z_fns: Sequence[ZFn | None],
                         weight: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-step uncertainty of frames ``first .. N-1`` of a rollout from >= 2 members, each predicting frame n from
    frames ``< n``: ``score_BT``, ``disagreement_BT``, ``entropy_BT``."""
    parts: dict[str, list[torch.Tensor]] = {"score": [], "disagreement": [], "entropy": []}
    for n in range(first, ids_BThw.shape[1]):
        preds = []
        for m, z_fn in zip(models, z_fns):
            lo = max(0, n - (m.max_frames - 1))
            ctx, acts = ids_BThw[:, lo:n], actions_norm_BTA[:, lo:n]
            z = None if z_fn is None else z_fn(ctx, acts)
            preds.append(m.predict_next(ctx, acts, z)["probs_BhwV"].flatten(1, 2))
        u = combine_predictions(torch.stack(preds), codebook_VE, weight)
        for key in parts:
            parts[key].append(u[key])
    return {f"{k}_BT": torch.stack(v, 1) for k, v in parts.items()}
