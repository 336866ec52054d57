"""MaskGIT pieces: the cosine mask schedule, training masks, random-token corruption and per-frame decoding
(docs/method.md, "Stage 3").
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def cosine_mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Share of tokens masked at schedule position ``u`` in [0, 1] (1 -> all masked at u=0)."""
    return torch.cos(u * math.pi / 2)


def training_mask(B: int, T: int, S: int, context_frames: int | torch.Tensor, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask ``[B, T, S]`` (True = masked): clean before ``context_frames`` (int or ``[B]``), cosine after."""
    u_BT = torch.rand(B, T, device=device, generator=generator)
    n_BT = torch.ceil(cosine_mask_ratio(u_BT) * S).clamp(min=1, max=S)
    ctx_B = torch.as_tensor(context_frames, device=device).expand(B)
    n_BT = n_BT.masked_fill(torch.arange(T, device=device)[None] < ctx_B[:, None], 0)
    rank_BTS = torch.rand(B, T, S, device=device, generator=generator).argsort(dim=-1).argsort(dim=-1)
    return rank_BTS < n_BT.unsqueeze(-1)  # the n lowest-ranked positions of a frame are masked


def corrupt_tokens(ids_BTS: torch.Tensor, mask_BTS: torch.Tensor, context_frames: int | torch.Tensor,
                   max_prob: float, vocab: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible tokens after the context replaced by random ids (p ~ U(0, max_prob) per frame): (ids, replaced)."""
    B, T, S = ids_BTS.shape
    if max_prob <= 0:
        return ids_BTS, torch.zeros_like(mask_BTS)
    dev = ids_BTS.device
    p_BT = torch.rand(B, T, 1, device=dev, generator=generator) * max_prob
    hit = (torch.rand(B, T, S, device=dev, generator=generator) < p_BT) & ~mask_BTS
    ctx_B = torch.as_tensor(context_frames, device=dev).expand(B)
    hit &= (torch.arange(T, device=dev)[None] >= ctx_B[:, None]).unsqueeze(-1)
    rand_ids = torch.randint(0, vocab, (B, T, S), device=dev, generator=generator)
    return torch.where(hit, rand_ids, ids_BTS), hit


def maskgit_decode_frame(logits_fn: Callable[[torch.Tensor], torch.Tensor], B: int, S: int, mask_id: int, steps: int,
                         temperature: float, device: torch.device | str, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame in ``steps`` MaskGIT steps of ``logits_fn(ids_BS) -> [B, S, V]`` (``temperature=0``: greedy):
    ``(ids_BS, token_prob_BS)``, the probability each chosen token had when it was fixed."""
    if steps < 1:
        raise ValueError(f"MaskGIT steps must be >= 1, got {steps}")
    ids_BS = torch.full((B, S), mask_id, dtype=torch.long, device=device)
    fixed_BS = torch.zeros(B, S, dtype=torch.bool, device=device)
    token_prob_BS = torch.zeros(B, S, device=device)
    for i in range(steps):
        logits_BSV = logits_fn(ids_BS).float()
        probs = logits_BSV.softmax(-1)
        if temperature > 0:
            flat = (logits_BSV / temperature).softmax(-1).reshape(B * S, -1)
            sampled_BS = torch.multinomial(flat, 1, generator=generator).view(B, S)
        else:
            sampled_BS = probs.argmax(-1)
        conf_BS = probs.gather(-1, sampled_BS.unsqueeze(-1)).squeeze(-1)
        ratio = cosine_mask_ratio(torch.tensor((i + 1) / steps)).item()
        n_masked_after = 0 if i == steps - 1 else math.floor(S * ratio)
        # the least confident still-free positions are re-masked; fixed ones never are
        order = torch.where(fixed_BS, torch.full_like(conf_BS, float("inf")), conf_BS).argsort(dim=-1)
        remask_BS = torch.zeros_like(fixed_BS)
        if n_masked_after > 0:
            remask_BS.scatter_(1, order[:, :n_masked_after], True)
        newly_BS = ~fixed_BS & ~remask_BS
        ids_BS = torch.where(newly_BS, sampled_BS, ids_BS)
        token_prob_BS = torch.where(newly_BS, conf_BS, token_prob_BS)
        fixed_BS |= newly_BS
    return ids_BS, token_prob_BS
