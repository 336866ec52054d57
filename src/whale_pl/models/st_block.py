"""The one spatial-temporal transformer block shared by the tokenizer, behavior model and dynamics.

A block is pre-norm: spatial self-attention within each frame (bidirectional), temporal
self-attention across frames at each spatial position (causal by default), then an MLP.
Attention goes through ``F.scaled_dot_product_attention`` so flash / memory-efficient kernels are
used where the device has them.

Conditioning (optional): ``cond_BTD`` — one vector per frame — modulates every LayerNorm
(adaptive LayerNorm: scale, shift and a zero-initialised residual gate), as in DiT. With
``cond_dim=None`` the block is a plain ST block.

Temporal key/value caching (for frame-by-frame generation): ``forward(x, kv_cache=...)`` takes the
keys/values of earlier frames and attends to them; ``forward(..., return_kv=True)`` also returns this
call's temporal keys/values so a caller can append the frames it has finalised.
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

    def forward(
        self,
        x_BLD: torch.Tensor,
        causal: bool = False,
        past_kv: KV | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """``attn_mask``: bool [L_q, L_k] (True = may attend); replaces the causal mask when given."""
        q, k, v = rearrange(self.qkv(x_BLD), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        mask = attn_mask
        if causal and mask is None:
            lq, lk = q.shape[2], k.shape[2]
            if past_kv is None and lq == lk:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
                )
                return self.proj(rearrange(out, "b h l d -> b l (h d)")), new_kv
            # queries are the last lq positions of a length-lk sequence
            offset = lk - lq
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=offset)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
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

    def forward(
        self, x_BTSD: torch.Tensor, cond_BTD: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the normalised input and the residual gate (None when unconditioned)."""
        h = self.norm(x_BTSD)
        if self.mod is None:
            return h, None
        if cond_BTD is None:
            raise ValueError("this block was built with cond_dim but got no cond_BTD")
        scale, shift, gate = self.mod(cond_BTD).unsqueeze(2).chunk(3, dim=-1)
        return h * (1 + scale) + shift, 1 + gate


class STBlock(nn.Module):
    """Spatial attention (within a frame) -> temporal attention (across frames) -> MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        cond_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.norm_s = AdaNorm(dim, cond_dim)
        self.attn_s = Attention(dim, heads, dropout)
        self.norm_t = AdaNorm(dim, cond_dim)
        self.attn_t = Attention(dim, heads, dropout)
        self.norm_m = AdaNorm(dim, cond_dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @staticmethod
    def _gated(delta: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return delta if gate is None else delta * gate

    def forward(
        self,
        x_BTSD: torch.Tensor,
        cond_BTD: torch.Tensor | None = None,
        kv_cache: KV | None = None,
        return_kv: bool = False,
        spatial_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KV]:
        """``x_BTSD``: [B, T, S, D] tokens. ``kv_cache``: temporal keys/values of the frames before
        these T frames, each [B*S, heads, T_past, D/heads]. ``spatial_mask``: bool [S, S] (True =
        may attend) restricting spatial attention, e.g. to a neighbourhood (``local_spatial_mask``)."""
        B, T, S, _ = x_BTSD.shape
        h, gate = self.norm_s(x_BTSD, cond_BTD)
        h, _ = self.attn_s(rearrange(h, "b t s d -> (b t) s d"), attn_mask=spatial_mask)
        x_BTSD = x_BTSD + self._gated(rearrange(h, "(b t) s d -> b t s d", b=B), gate)

        h, gate = self.norm_t(x_BTSD, cond_BTD)
        h, kv = self.attn_t(rearrange(h, "b t s d -> (b s) t d"), causal=self.causal, past_kv=kv_cache)
        x_BTSD = x_BTSD + self._gated(rearrange(h, "(b s) t d -> b t s d", b=B), gate)

        h, gate = self.norm_m(x_BTSD, cond_BTD)
        x_BTSD = x_BTSD + self._gated(self.mlp(h), gate)
        return (x_BTSD, kv) if return_kv else x_BTSD


def local_spatial_mask(h: int, w: int, radius: int, name: str = "radius") -> torch.Tensor:
    """bool [h*w, h*w]: position i may attend to j when their grid rows and columns differ by at most
    ``radius`` (0: each position sees only itself, so its output depends on its own input alone).
    ``name``: what a bad radius is called in the error (the caller's config key)."""
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"{name}={radius!r}: expected an integer >= 0 (positions of grid distance <= {name} "
                         "attend to each other)")
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    return ((y[:, None] - y[None]).abs() <= radius) & ((x[:, None] - x[None]).abs() <= radius)


class STTransformer(nn.Module):
    """A stack of ``STBlock``s with a final LayerNorm; caches per-layer temporal keys/values.
    ``spatial_mask`` (bool [S, S], optional) restricts every block's spatial attention."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        cond_dim: int | None = None,
        dropout: float = 0.0,
        spatial_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            STBlock(dim, heads, mlp_ratio, causal, cond_dim, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("spatial_mask", spatial_mask, persistent=False)

    def forward(
        self,
        x_BTSD: torch.Tensor,
        cond_BTD: torch.Tensor | None = None,
        kv_cache: list[KV] | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Run the blocks (each attending to its layer's ``kv_cache`` entry) and the final norm; with
        ``return_kv`` also this call's per-layer temporal keys/values."""
        new_kv: list[KV] = []
        for i, block in enumerate(self.blocks):
            past = None if kv_cache is None else kv_cache[i]
            x_BTSD, kv = block(x_BTSD, cond_BTD, kv_cache=past, return_kv=True, spatial_mask=self.spatial_mask)
            new_kv.append(kv)
        x_BTSD = self.norm(x_BTSD)
        return (x_BTSD, new_kv) if return_kv else x_BTSD


def append_kv(cache: list[KV] | None, new: list[KV]) -> list[KV]:
    """Concatenate per-layer temporal keys/values of newly finalised frames onto a cache."""
    if cache is None:
        return new
    return [(torch.cat([ck, nk], dim=2), torch.cat([cv, nv], dim=2)) for (ck, cv), (nk, nv) in zip(cache, new)]
