"""Stage 2: the behavior-conditioning VAE: posterior q(z | tau_{0:T}), causal prior p(z_t | tau_{0:t}) whose
mean conditions stage 3, and action decoder pi(a_t | o_t, z) (docs/method.md, "Stage 2").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from whale_pl.models.st_block import STTransformer

LOGVAR_MIN, LOGVAR_MAX = -10.0, 6.0


def sinusoidal_time_BTD(T: int, dim: int, device: torch.device) -> torch.Tensor:
    """[1, T, dim] sinusoidal embedding of step indices 0..T-1 (no maximum length)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * freqs[None]
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(T, 1, device=device)], dim=-1)
    return emb[None]


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) (broadcasting), in nats."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise negative log-likelihood of x under N(mu, e^logvar), in nats."""
    return 0.5 * (logvar + (x - mu) ** 2 / logvar.exp() + math.log(2 * math.pi))


class GridPool(nn.Module):
    """Multi-head attention pooling of a frame's h*w code vectors into one feature (one softmax per head)."""

    def __init__(self, code_dim: int, dim: int, grid_tokens: int, heads: int) -> None:
        super().__init__()
        self.heads = heads  # dim % heads is checked by the transformers' attention
        self.inp = nn.Linear(code_dim, dim)
        self.pos_SD = nn.Parameter(torch.randn(grid_tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, heads)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, codes_BThwE: torch.Tensor) -> torch.Tensor:
        """[B, T, h, w, C] code vectors -> [B, T, dim] per-frame features."""
        B = codes_BThwE.shape[0]
        x = self.norm(self.inp(rearrange(codes_BThwE, "b t h w c -> (b t) (h w) c")) + self.pos_SD)
        attn_NSH = self.score(x).softmax(dim=1)
        # the value map is affine and the weights sum to 1: pool each head first, then project its pool
        pooled_NHD = torch.einsum("nsh,nsd->nhd", attn_NSH, x)
        w_HED = rearrange(self.value.weight, "(heads e) d -> heads e d", heads=self.heads)
        b_HE = rearrange(self.value.bias, "(heads e) -> heads e", heads=self.heads)
        feat = torch.einsum("nhd,hed->nhe", pooled_NHD, w_HED.to(pooled_NHD.dtype)) + b_HE.to(pooled_NHD.dtype)
        return rearrange(self.out(rearrange(feat, "n h e -> n (h e)")), "(b t) d -> b t d", b=B)


@dataclass
class BehaviorOutput:
    """Everything ``BehaviorModel.loss`` computes, for logging and analysis."""

    loss: torch.Tensor
    nll: torch.Tensor  # mean over B, T of the action NLL summed over action dims
    kl: torch.Tensor  # mean over B, T of KL(q || p_t) summed over z dims (the loss's KL term)
    action_mse: torch.Tensor  # decoder mean vs true action, with posterior-mean z
    action_mse_prior: torch.Tensor  # decoder mean vs true action, with the prior mean z_t
    post_mu_BZ: torch.Tensor
    prior_mu_BTZ: torch.Tensor


@dataclass
class BehaviorNet:
    """The behavior VAE's architecture (``BehaviorModule``'s ``net:`` group)."""

    z_dim: int = 16
    dim: int = 64
    depth: int = 2
    heads: int = 4
    decoder_hidden: int = 128
    dropout: float = 0.0
    decoder_prev_action: bool = False  # the action decoder also sees a_{t-1} (never a_t)


class BehaviorModel(nn.Module):
    """Posterior, causal prior and action decoder over (code grids, actions)."""

    def __init__(self, code_dim: int, action_dim: int, grid_tokens: int, z_dim: int = 16, dim: int = 64,
                 depth: int = 2, heads: int = 4, decoder_hidden: int = 128,
                 dropout: float = 0.0, decoder_prev_action: bool = False) -> None:
        super().__init__()
        self.decoder_prev_action = decoder_prev_action
        self.code_dim, self.action_dim, self.z_dim, self.dim = code_dim, action_dim, z_dim, dim
        self.pool = GridPool(code_dim, dim, grid_tokens, heads)
        self.post_in = nn.Linear(dim + action_dim, dim)
        self.prior_in = nn.Linear(dim + action_dim, dim)
        self.post_tf = STTransformer(dim, depth, heads, causal=False, dropout=dropout)
        self.prior_tf = STTransformer(dim, depth, heads, causal=True, dropout=dropout)
        self.post_head = nn.Linear(dim, 2 * z_dim)
        self.prior_head = nn.Linear(dim, 2 * z_dim)
        self.decoder = nn.Sequential(
            nn.Linear(dim + z_dim + (action_dim if decoder_prev_action else 0), decoder_hidden), nn.GELU(),
            nn.Linear(decoder_hidden, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, 2 * action_dim))

    def _encode(self, proj: nn.Linear, tf: STTransformer, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor):
        """One token per step from (frame feature, a_t) plus its time embedding, through ``tf``: [B, T, dim]."""
        x = proj(torch.cat([feat_BTD, actions_BTA], dim=-1))
        x = x + sinusoidal_time_BTD(x.shape[1], self.dim, x.device).to(x.dtype)
        return tf(rearrange(x, "b t d -> b t 1 d"))[:, :, 0]

    @staticmethod
    def _split(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped log-variance halves of a Gaussian head's output."""
        mu, logvar = h.float().chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def posterior(self, codes_BThwE: torch.Tensor, actions_BTA: torch.Tensor,
                  feat_BTD: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | tau_{0:T}) -> (mu_BZ, logvar_BZ), bidirectional (``feat_BTD``: the codes' features, if computed)."""
        feat_BTD = self.pool(codes_BThwE) if feat_BTD is None else feat_BTD
        return self._split(self.post_head(self._encode(self.post_in, self.post_tf, feat_BTD, actions_BTA).mean(dim=1)))

    def prior(self, codes_BThwE: torch.Tensor, actions_BTA: torch.Tensor,
              feat_BTD: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_t | tau_{0:t}) -> (mu_BTZ, logvar_BTZ), causal: step t sees codes and actions at steps <= t only."""
        feat_BTD = self.pool(codes_BThwE) if feat_BTD is None else feat_BTD
        return self._split(self.prior_head(self._encode(self.prior_in, self.prior_tf, feat_BTD, actions_BTA)))

    def decode(self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """pi(a_t | o_t, z) (``decoder_prev_action``: also a_{t-1}): mean and log-variance, [B, T, A] each."""
        parts = [feat_BTD]
        if self.decoder_prev_action:
            prev_BTA = torch.cat([torch.zeros_like(actions_BTA[:, :1]), actions_BTA[:, :-1]], dim=1)
            parts.append(prev_BTA.to(feat_BTD.dtype))
        parts.append(z_BTZ.to(feat_BTD.dtype))
        return self._split(self.decoder(torch.cat(parts, dim=-1)).float())

    def action_nll(self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """-log pi(a_t | o_t, z) per step [B, T] (nats, over all action dims) and the decoder's mean [B, T, A]."""
        mu, logvar = self.decode(feat_BTD, z_BTZ, actions_BTA)
        return gaussian_nll(actions_BTA.float(), mu, logvar).sum(-1), mu

    def loss(self, codes_BThwE: torch.Tensor, actions_BTA: torch.Tensor, beta: float, sample: bool = True,
             kl_balance: float | None = None) -> BehaviorOutput:
        """Action NLL + beta * KL(q || p_t), averaged over B and t; decodes a posterior draw (``sample``) or mean."""
        feat_BTD = self.pool(codes_BThwE)
        mu_q, logvar_q = self.posterior(codes_BThwE, actions_BTA, feat_BTD)
        mu_p, logvar_p = self.prior(codes_BThwE, actions_BTA, feat_BTD)
        z_BZ = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp() if sample else mu_q
        nll_BT, a_mu = self.action_nll(feat_BTD, z_BZ[:, None].expand(-1, actions_BTA.shape[1], -1), actions_BTA)
        nll = nll_BT.mean()
        kl = self.kl_term(mu_q, logvar_q, mu_p, logvar_p, kl_balance).sum()
        with torch.no_grad():
            mse = (a_mu - actions_BTA).pow(2).mean()
            mse_p = (self.decode(feat_BTD, mu_p, actions_BTA)[0] - actions_BTA).pow(2).mean()
        return BehaviorOutput(loss=nll + beta * kl, nll=nll, kl=kl, action_mse=mse,
                              action_mse_prior=mse_p, post_mu_BZ=mu_q, prior_mu_BTZ=mu_p)

    @staticmethod
    def kl_term(mu_q_BZ: torch.Tensor, logvar_q_BZ: torch.Tensor, mu_p_BTZ: torch.Tensor, logvar_p_BTZ: torch.Tensor,
                kl_balance: float | None = None) -> torch.Tensor:
        """KL(q || p_t) per z dimension ``[Z]`` (mean over B, t; with ``kl_balance``, its balanced gradient)."""
        mq, lq = mu_q_BZ[:, None], logvar_q_BZ[:, None]
        if kl_balance is None:
            kl_BTZ = gaussian_kl(mq, lq, mu_p_BTZ, logvar_p_BTZ)
        else:
            to_prior = gaussian_kl(mq.detach(), lq.detach(), mu_p_BTZ, logvar_p_BTZ)
            to_post = gaussian_kl(mq, lq, mu_p_BTZ.detach(), logvar_p_BTZ.detach())
            kl_BTZ = kl_balance * to_prior + (1 - kl_balance) * to_post
        return kl_BTZ.mean(dim=(0, 1))
