"""Vector quantiser with low-dimensional, l2-normalised codes (ViT-VQGAN style), its codebook initialised from
the first training batch and learned by EMA, dead codes restarted (docs/method.md, "Stage 1").
Under ``torch.distributed`` every rank keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """What one quantiser call gives: codes, ids, commitment loss, restarted codes."""

    codes_NC: torch.Tensor  # quantised, straight-through (gradient flows to the input)
    ids_N: torch.Tensor  # long code indices
    commit_loss: torch.Tensor  # beta * ||z - sg(q)||^2
    restarted: int  # codes restarted in this call


def distributed() -> bool:
    """Whether this process is one of several ``torch.distributed`` ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over ``codebook_size`` unit vectors of size ``code_dim``."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, decay: float = 0.99,
                 restart_threshold: float = 0.03) -> None:
        super().__init__()
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"codebook_size={codebook_size} must be >= 2 and code_dim={code_dim} >= 1")
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.decay, self.restart_threshold = decay, restart_threshold
        init = F.normalize(torch.randn(codebook_size, code_dim), dim=-1)
        self.register_buffer("codebook", init.clone())
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("ema_count", torch.ones(codebook_size))  # inputs each code received per step
        self.register_buffer("initialized", torch.tensor(False))

    def normalized_codebook(self) -> torch.Tensor:
        """The codebook ``[V, C]`` with unit-length rows."""
        return F.normalize(self.codebook, dim=-1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors (unit length) of ``ids`` of any shape -> [..., code_dim]."""
        return F.embedding(ids, self.normalized_codebook())

    @torch.no_grad()
    def lookup(self, z_XC: torch.Tensor) -> torch.Tensor:
        """Index ``[...]`` of the nearest code for each latent ``[..., C]``, in float32 under any autocast."""
        with torch.autocast(z_XC.device.type, enabled=False):
            return (F.normalize(z_XC.float(), dim=-1) @ self.normalized_codebook().float().t()).argmax(dim=-1)

    def forward(self, z_NC: torch.Tensor) -> QuantizerOutput:
        """Quantise rows of ``z_NC`` (straight-through); in training also update and restart codes."""
        z_NC = F.normalize(z_NC.float(), dim=-1)
        if self.training and not bool(self.initialized):
            self._init_from(z_NC.detach())
        ids_N = self.lookup(z_NC)
        q_NC = self.embed(ids_N)
        loss = self.beta * F.mse_loss(z_NC, q_NC.detach())
        restarted = self._update(z_NC.detach(), ids_N) if self.training else 0
        return QuantizerOutput(z_NC + (q_NC - z_NC).detach(), ids_N, loss, restarted)

    @torch.no_grad()
    def _sample_rows(self, z_NC: torch.Tensor, n: int, weights_N: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` rows of ``z_NC`` (drawn in proportion to ``weights_N`` if given), identical on all ranks."""
        if weights_N is not None and float(weights_N.sum()) > 0:
            idx = torch.multinomial(weights_N.float(), n, replacement=n > z_NC.shape[0])
        else:
            idx = torch.randint(0, z_NC.shape[0], (n,), device=z_NC.device)
        rows = F.normalize(z_NC[idx] + 1e-3 * torch.randn_like(z_NC[idx]), dim=-1)
        if distributed():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def _init_from(self, z_NC: torch.Tensor) -> None:
        """Set the codebook to rows of the first training batch."""
        rows = self._sample_rows(z_NC, self.codebook_size)
        self.codebook.copy_(rows)
        self.ema_sum.copy_(rows)
        self.ema_count.zero_()  # codes that win nothing in the first steps are restarted at once
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z_NC: torch.Tensor, ids_N: torch.Tensor) -> int:
        """Update the EMA codebook and usage statistics with a batch's assignments; restart dead codes."""
        counts_K = torch.bincount(ids_N, minlength=self.codebook_size).float()
        sums_KC = torch.zeros_like(self.ema_sum).index_add_(0, ids_N, z_NC)
        if distributed():
            dist.all_reduce(counts_K)
            dist.all_reduce(sums_KC)
        self.ema_count.mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums_KC, alpha=1 - self.decay)
        used = self.ema_count > 1e-8
        self.codebook[used] = F.normalize(self.ema_sum[used], dim=-1)
        # a dead code moves onto an input the codebook fits worst and gets a full share, so it has time to win
        expected = counts_K.sum() / self.codebook_size
        dead_K = self.ema_count < self.restart_threshold * expected
        n_dead = int(dead_K.sum())
        if n_dead:
            err_N = (1 - (z_NC @ self.normalized_codebook().t()).amax(dim=-1)).clamp_min(0)
            rows = self._sample_rows(z_NC, n_dead, err_N)
            self.codebook[dead_K] = rows
            self.ema_count[dead_K] = expected
            self.ema_sum[dead_K] = rows * expected
        return n_dead
