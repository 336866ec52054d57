"""Uncertainty of one imagined frame from several predictions of it (METHOD.md, retracing-rollout).

Both the retracing-rollout (K predictions from K anchors of one model) and the ensemble baseline
(N models from the same context) end here, so the two are scored by the same formula:

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

import torch
from einops import einsum


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
