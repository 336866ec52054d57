"""The spatial-temporal transformer shared by the tokenizer, behavior model and dynamics: spatial attention
within each frame, temporal attention across frames (causal, keys/values cacheable), an MLP; with ``cond_dim``
adaptive LayerNorms (docs/method.md, "Stage 1" and "Stage 3").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of ``x_BLD`` via SDPA."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_BLD: torch.Tensor, causal: bool = False, past_kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Attend (after ``past_kv``'s positions, if given); return the output and this call's keys/values."""
        q, k, v = rearrange(self.qkv(x_BLD), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        new_kv = (k, v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        mask = None
        if causal and past_kv is not None:  # the queries are the last lq of lk positions
            lq, lk = q.shape[2], k.shape[2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h l d -> b l (h d)")), new_kv


class AdaNorm(nn.Module):
    """LayerNorm, optionally modulated per frame by a conditioning vector (scale, shift, gate)."""

    def __init__(self, dim: int, cond_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim is None)
        self.mod = None
        if cond_dim is not None:
            self.mod = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.mod.weight)
            nn.init.zeros_(self.mod.bias)

    def forward(self, x_BTSD: torch.Tensor, cond_BTD: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The normalised input and the residual gate (None when unconditioned)."""
        h = self.norm(x_BTSD)
        if self.mod is None:
            return h, None
        scale, shift, gate = self.mod(cond_BTD).unsqueeze(2).chunk(3, dim=-1)
        return h * (1 + scale) + shift, 1 + gate


def _gated(delta: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return delta if gate is None else delta * gate


class STBlock(nn.Module):
    """Spatial attention (within a frame) -> temporal attention (across frames) -> MLP."""

    def __init__(self, dim: int, heads: int, causal: bool = True, cond_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.causal = causal
        self.norm_s = AdaNorm(dim, cond_dim)
        self.attn_s = Attention(dim, heads, dropout)
        self.norm_t = AdaNorm(dim, cond_dim)
        self.attn_t = Attention(dim, heads, dropout)
        self.norm_m = AdaNorm(dim, cond_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x_BTSD: torch.Tensor, cond_BTD: torch.Tensor | None = None,
                kv_cache: KV | None = None) -> tuple[torch.Tensor, KV]:
        """[B, T, S, D] tokens after the block and their temporal keys/values (after ``kv_cache``'s frames)."""
        B = x_BTSD.shape[0]
        h, gate = self.norm_s(x_BTSD, cond_BTD)
        h, _ = self.attn_s(rearrange(h, "b t s d -> (b t) s d"))
        x_BTSD = x_BTSD + _gated(rearrange(h, "(b t) s d -> b t s d", b=B), gate)
        h, gate = self.norm_t(x_BTSD, cond_BTD)
        h, kv = self.attn_t(rearrange(h, "b t s d -> (b s) t d"), causal=self.causal, past_kv=kv_cache)
        x_BTSD = x_BTSD + _gated(rearrange(h, "(b s) t d -> b t s d", b=B), gate)
        h, gate = self.norm_m(x_BTSD, cond_BTD)
        return x_BTSD + _gated(self.mlp(h), gate), kv


class STTransformer(nn.Module):
    """A stack of ``STBlock``s with a final LayerNorm; caches per-layer temporal keys/values."""

    def __init__(self, dim: int, depth: int, heads: int, causal: bool = True,
                 cond_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(STBlock(dim, heads, causal, cond_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_BTSD: torch.Tensor, cond_BTD: torch.Tensor | None = None, kv_cache: list[KV] | None = None,
                return_kv: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """The blocks (after ``kv_cache``'s frames) and final norm; with ``return_kv`` also per-layer keys/values."""
        new_kv: list[KV] = []
        for i, block in enumerate(self.blocks):
            x_BTSD, kv = block(x_BTSD, cond_BTD, None if kv_cache is None else kv_cache[i])
            new_kv.append(kv)
        x_BTSD = self.norm(x_BTSD)
        return (x_BTSD, new_kv) if return_kv else x_BTSD


def append_kv(cache: list[KV], new: list[KV]) -> list[KV]:
    """Concatenate per-layer temporal keys/values of newly finalised frames onto a cache."""
    return [(torch.cat([ck, nk], dim=2), torch.cat([cv, nv], dim=2)) for (ck, cv), (nk, nv) in zip(cache, new)]
