"""The deep-ensemble baseline: N dynamics models trained with different seeds by the same command
(``whale fit --config stages/<scale>/dynamics.yaml --seed_everything k
--trainer.default_root_dir runs/<scale>/ensemble/k``); the uncertainty of an imagined frame is the
disagreement of their predictions of it from the same context.

Scored by the same formula as retracing (:func:`whale_pl.rollout.retracing.combine_predictions`):
feature disagreement among the N token distributions plus the entropy of their mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from whale_pl.rollout.retracing import ZFn, combine_predictions


@torch.no_grad()
def ensemble_uncertainty(
    models: Sequence[torch.nn.Module],
    ids_BNhw: torch.Tensor,
    actions_norm_BTA: torch.Tensor,
    first: int,
    codebook_VC: torch.Tensor | None = None,
    z_fns: Sequence[ZFn | None] | None = None,
    weight: float = 0.5,
    max_context: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-step ensemble uncertainty of frames ``first .. N-1`` of a rollout ``ids_BNhw``: every
    member predicts frame n from frames ``< n`` (the same rollout) with the single-step actions.
    Returns ``score_BH``, ``disagreement_BH``, ``entropy_BH``. N ``predict_next`` passes per step."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(models)}")
    z_fns = list(z_fns) if z_fns is not None else [None] * len(models)
    if len(z_fns) != len(models):
        raise ValueError(f"{len(z_fns)} behavior priors for {len(models)} ensemble members")
    V = {m.codebook_size for m in models}
    if len(V) != 1:
        raise ValueError(f"ensemble members disagree on the codebook size: {sorted(V)}")
    codes = torch.eye(V.pop(), device=ids_BNhw.device) if codebook_VC is None else codebook_VC
    N = ids_BNhw.shape[1]
    parts: dict[str, list[torch.Tensor]] = {"score": [], "disagreement": [], "entropy": []}
    for n in range(first, N):
        preds = []
        for m, z_fn in zip(models, z_fns):
            max_ctx = (m.max_frames - 1) if max_context is None else max_context
            lo = max(0, n - max_ctx)
            ctx, acts = ids_BNhw[:, lo:n], actions_norm_BTA[:, lo:n]
            z = None if z_fn is None else z_fn(ctx, acts)
            preds.append(m.predict_next(ctx, acts, z)["probs_BhwV"].flatten(1, 2))
        u = combine_predictions(torch.stack(preds), codes, weight)
        for key in parts:
            parts[key].append(u[key])
    return {f"{k}_BH": torch.stack(v, 1) for k, v in parts.items()}
