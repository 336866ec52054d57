"""Vector quantiser with low-dimensional, l2-normalised codes (ViT-VQGAN style).

Inputs are projected (by the caller) to ``code_dim`` and l2-normalised; the nearest code is the one
of highest cosine similarity. Low-dimensional normalised codes keep the codebook well used.
Gradients pass straight through to the encoder; a commitment loss pulls the encoder towards its
codes. The codebook is learned either by exponential moving averages of the assigned inputs
(``ema=True``, the default) or by gradient through a codebook loss. Codes whose (EMA) usage falls
below ``restart_threshold`` times the expected share (inputs per step / codebook size) are restarted at random encoder outputs of the
current batch, drawn in proportion to how badly the codebook fits them (dead-code restart). The first training batch initialises the codebook from data.
Under ``torch.distributed`` the statistics are all-reduced and restarts broadcast from rank 0, so
every rank keeps the same codebook.
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
    commit_loss: torch.Tensor  # beta * ||z - sg(q)||^2 (+ codebook loss when not EMA)
    restarted: int  # codes restarted in this call


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over ``codebook_size`` unit vectors of size ``code_dim``."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        restart_threshold: float = 0.03,
        init_from_data: bool = True,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"codebook_size={codebook_size} must be >= 2 and code_dim={code_dim} >= 1")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.restart_threshold = restart_threshold
        init = F.normalize(torch.randn(codebook_size, code_dim), dim=-1)
        if ema:
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init.clone())
        # EMA of how many inputs each code received per step (both modes; drives restarts)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(not init_from_data))

    def normalized_codebook(self) -> torch.Tensor:
        """The codebook ``[V, C]`` with unit-length rows."""
        return F.normalize(self.codebook, dim=-1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors (unit length) of ``ids`` of any shape -> [..., code_dim]."""
        return F.embedding(ids, self.normalized_codebook())

    @torch.no_grad()
    def similarities(self, z_XC: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[..., V]`` of each latent ``[..., C]`` to every code, in float32 even
        under autocast (a bf16 similarity flips near-ties between codes at random)."""
        with torch.autocast(z_XC.device.type, enabled=False):
            return F.normalize(z_XC.float(), dim=-1) @ self.normalized_codebook().float().t()

    @torch.no_grad()
    def lookup(self, z_XC: torch.Tensor) -> torch.Tensor:
        """Index ``[...]`` of the nearest code (cosine similarity) for each latent ``[..., C]``."""
        return self.similarities(z_XC).argmax(dim=-1)

    def forward(self, z_NC: torch.Tensor) -> QuantizerOutput:
        """Quantise rows of ``z_NC`` (straight-through); in training also update and restart codes."""
        z_NC = F.normalize(z_NC.float(), dim=-1)
        if self.training and not bool(self.initialized):
            self._init_from(z_NC.detach())
        ids_N = self.lookup(z_NC)
        q_NC = self.embed(ids_N)
        loss = self.beta * F.mse_loss(z_NC, q_NC.detach())
        if not self.ema:
            loss = loss + F.mse_loss(q_NC, z_NC.detach())
        restarted = 0
        if self.training:
            restarted = self._update(z_NC.detach(), ids_N)
        codes_NC = z_NC + (q_NC - z_NC).detach()
        return QuantizerOutput(codes_NC, ids_N, loss, restarted)

    @torch.no_grad()
    def _sample_rows(self, z_NC: torch.Tensor, n: int, weights_N: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` rows of ``z_NC`` (drawn in proportion to ``weights_N`` if given), identical on all ranks."""
        if weights_N is not None and float(weights_N.sum()) > 0:
            idx = torch.multinomial(weights_N.float(), n, replacement=n > z_NC.shape[0])
        else:
            idx = torch.randint(0, z_NC.shape[0], (n,), device=z_NC.device)
        rows = F.normalize(z_NC[idx] + 1e-3 * torch.randn_like(z_NC[idx]), dim=-1)
        if _dist_on():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def _init_from(self, z_NC: torch.Tensor) -> None:
        rows = self._sample_rows(z_NC, self.codebook_size)
        self.codebook.data.copy_(rows)
        if self.ema:
            self.ema_sum.copy_(rows)
        self.ema_count.zero_()  # codes that win nothing in the first steps are restarted at once
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z_NC: torch.Tensor, ids_N: torch.Tensor) -> int:
        counts_K = torch.bincount(ids_N, minlength=self.codebook_size).float()
        sums_KC = None
        if self.ema:
            sums_KC = torch.zeros_like(self.ema_sum).index_add_(0, ids_N, z_NC)
        if _dist_on():
            dist.all_reduce(counts_K)
            if sums_KC is not None:
                dist.all_reduce(sums_KC)
        self.ema_count.mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
        if self.ema:
            self.ema_sum.mul_(self.decay).add_(sums_KC, alpha=1 - self.decay)
            used = self.ema_count > 1e-8
            self.codebook[used] = F.normalize(self.ema_sum[used], dim=-1)
        # dead-code restart: EMA usage far below the expected share of a step's inputs -> move the
        # code onto a live encoder output and give it a full share, so it has time to win inputs
        expected = counts_K.sum() / self.codebook_size
        dead_K = self.ema_count < self.restart_threshold * expected
        n_dead = int(dead_K.sum())
        if n_dead:
            # new codes go where the codebook fits worst: inputs drawn by their quantisation error
            err_N = (1 - (z_NC @ self.normalized_codebook().t()).amax(dim=-1)).clamp_min(0)
            rows = self._sample_rows(z_NC, n_dead, err_N)
            self.codebook.data[dead_K] = rows
            level = expected
            self.ema_count[dead_K] = level
            if self.ema:
                self.ema_sum[dead_K] = rows * level
        return n_dead
