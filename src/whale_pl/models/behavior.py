"""Stage 2: the behavior-conditioning VAE (posterior, prior, action decoder).

Learns a behavior embedding z that captures *how the acting policy decides* from an
(observation, action) history. Observations arrive as the frozen tokenizer's code vectors
``codes_BThwC``; a small learned attention pooling (a summary token attending over the h x w grid)
turns each frame into one feature vector. Each step t becomes one token from (frame feature,
normalised action a_t), with a sinusoidal time embedding, and runs through the shared ST transformer
with S = 1 (a purely temporal transformer):

- posterior q(z | tau_{0:T}): bidirectional over the segment, mean-pooled over t -> (mu_BZ, logvar_BZ);
- prior p(z_t | tau_{0:t}): causal, one Gaussian per step -> (mu_BTZ, logvar_BTZ). tau_{0:t} includes
  a_t (our choice: at imagination time the action about to be taken is known);
- decoder pi(a_t | o_t, z): MLP on (frame feature of o_t, z) -> Gaussian mean and log-variance of a_t
  (both depend on z: a noisier policy gets a wider Gaussian). With ``decoder_prev_action`` it also sees
  a_{t-1} (never a_t): the previous action predicts most of a smooth policy's next one, so the NLL
  measures what is left -- jitter, random steps -- which is where the policy families differ.
  With ``decoder_z='modulate'`` the decoder MLP sees o_t only: z sets, through one linear map, only the
  episode's deviation from that base policy (scale, bias, noise, outlier rate, inertia towards a_{t-1}).

Loss (beta-VAE / information bottleneck): mean_t NLL(a_t) + beta * mean_t KL(q || p_t), with optional
free bits (a floor per z dimension on the batch-mean KL) against posterior collapse. Optional terms (``loss``) shape
z further; the change term (``change_nll``: the histogram of a_t - a_{t-1} read linearly from z, with neither o_t nor
a_{t-1} to explain the changes away) with the ``window_mean`` encoder over the actions alone is what
``stages/demo/behavior_episodes.yaml`` uses (docs/findings.md, stage 2). With ``encoder_stats`` the z heads also read
fixed statistics of the actions each z has seen (``pooled_stats``: moments, change histogram, raw-unit saturation /
rest / jump rates, reversals, std -- groups chosen in the config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from whale_pl.models.st_block import STTransformer

LOGVAR_MIN, LOGVAR_MAX = -10.0, 6.0
# bin edges (normalised action units) of the action-change histogram p(a_t - a_{t-1} | z): fine near 0 (a smooth
# policy's changes), coarse in the tails (random jumps); 13 bins per action dim
CHANGE_EDGES = (-2.0, -1.0, -0.5, -0.25, -0.1, -0.03, 0.03, 0.1, 0.25, 0.5, 1.0, 2.0)
# bin edges of the action-level histogram p(|a_t| | z) (normalised units): near zero (a policy at rest), half
# speed, the clip bound (|raw a| = 1 is about 2 normalised units), beyond it
LEVEL_EDGES = (0.03, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# ``encoder_stats`` groups of fixed action statistics, in the order the z heads read them (``pooled_stats``); ``True``
# means the first two (what session 18 measured)
STAT_GROUPS = ("moments", "changes", "rates", "turns", "std")
DEFAULT_STAT_GROUPS = ("moments", "changes")
# ``rates`` thresholds, as fractions of the raw action bound: at the bound, near zero, a jump between two steps
RATE_SATURATED, RATE_NEAR_ZERO, RATE_JUMP = 0.999, 0.05, 0.5


def stat_groups(encoder_stats: bool | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``encoder_stats`` as the tuple of groups it turns on (in ``STAT_GROUPS`` order); True: ``DEFAULT_STAT_GROUPS``."""
    if encoder_stats is True:
        return DEFAULT_STAT_GROUPS
    if not encoder_stats:
        return ()
    groups = [encoder_stats] if isinstance(encoder_stats, str) else list(encoder_stats)
    bad = [g for g in groups if g not in STAT_GROUPS]
    if bad or len(set(groups)) != len(groups):
        raise ValueError(f"encoder_stats must be true/false or a list of distinct groups from {list(STAT_GROUPS)}, "
                         f"got {encoder_stats!r}")
    return tuple(g for g in STAT_GROUPS if g in groups)


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


def laplace_nll(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise negative log-likelihood of x under the Laplace with mean mu and variance e^logvar (scale
    b = sqrt(e^logvar / 2)), in nats."""
    log_b = 0.5 * (logvar - math.log(2.0))
    return math.log(2.0) + log_b + (x - mu).abs() / log_b.exp()


class GridPool(nn.Module):
    """Multi-head attention pooling of a frame's h*w code vectors into one feature: each head
    scores every grid position (from its code and a learned position embedding), softmaxes over the
    grid and averages that head's slice of the projected codes. Cheap (no token-token attention),
    and it can learn to look at the gripper and the object rather than the whole picture."""

    def __init__(self, code_dim: int, dim: int, grid_tokens: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.grid_tokens, self.heads = grid_tokens, heads
        self.inp = nn.Linear(code_dim, dim)
        self.pos_SD = nn.Parameter(torch.randn(grid_tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, heads)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, codes_BThwC: torch.Tensor) -> torch.Tensor:
        B, T, h, w, C = codes_BThwC.shape
        if h * w != self.grid_tokens:
            raise ValueError(
                f"codes grid {h}x{w} = {h * w} tokens, but the behavior model was built for "
                f"grid_tokens={self.grid_tokens}"
            )
        x = self.norm(self.inp(rearrange(codes_BThwC, "b t h w c -> (b t) (h w) c")) + self.pos_SD)
        attn_NSH = self.score(x).softmax(dim=1)
        # sum_s attn[s,h] * value(x_s)[head h] == value_h(sum_s attn[s,h] * x_s), value_h being head h's rows of
        # the (affine) value map and the weights summing to 1: pool first, then project each head's pool
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
    kl: torch.Tensor  # mean over B, T of KL(q || p_t) summed over z dims (before free bits)
    kl_loss: torch.Tensor  # the KL term that enters the loss (after free bits)
    action_mse: torch.Tensor  # decoder mean vs true action, with posterior-mean z
    action_mse_prior: torch.Tensor  # decoder mean vs true action, with the prior mean z_t
    marginal_nll: torch.Tensor  # mean over B, T of the observation-free action NLL -log p(a_t, da_t | z)
    change_nll: torch.Tensor  # change_nll (posterior z) + change_nll (prior z_{t-1}), each mean over B, t >= 1; 0 when off
    prior_nll: torch.Tensor  # mean over B and t >= 1 of the action NLL with z from the prior p(z_{t-1} | tau_{0:t-1})
    post_mu_BZ: torch.Tensor
    prior_mu_BTZ: torch.Tensor


class BehaviorModel(nn.Module):
    """Posterior, causal prior and action decoder over (code grids, actions)."""

    def __init__(
        self,
        code_dim: int,
        action_dim: int,
        grid_tokens: int,
        z_dim: int = 16,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        decoder_hidden: int = 128,
        dropout: float = 0.0,
        action_deltas: bool = False,
        decoder_prev_action: bool = False,
        action_likelihood: str = "gaussian",
        mixture_k: int = 4,
        decoder_state_dim: int = 0,
        encoder: str = "transformer",
        window: int = 4,
        decoder_z: str = "input",
        modulate_outliers: bool = True,
        marginal_head: bool = False,
        encoder_frames: bool = True,
        change_edges: tuple[float, ...] | None = None,
        level_edges: tuple[float, ...] | None = None,
        window_shared: bool = False,
        encoder_stats: bool | list[str] = False,
        action_mean: list[float] | None = None,
        action_std: list[float] | None = None,
        rate_dims: list[int] | None = None,
        action_bound: float = 1.0,
    ) -> None:
        super().__init__()
        self.stat_groups = stat_groups(encoder_stats)
        if "rates" in self.stat_groups:  # thresholds apply to raw actions: undo the data's fixed normalisation
            if action_mean is None or action_std is None:
                raise ValueError("encoder_stats 'rates' needs the data's action_mean and action_std (raw-unit thresholds)")
            dims = list(range(action_dim)) if rate_dims is None else [int(i) for i in rate_dims]
            if not dims or any(not 0 <= i < action_dim for i in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"rate_dims must be distinct action dims in [0, {action_dim}), got {rate_dims}")
            if len(action_mean) != action_dim or len(action_std) != action_dim:
                raise ValueError(f"action_mean / action_std need {action_dim} values, got {len(action_mean)} / "
                                 f"{len(action_std)}")
            if not action_bound > 0:
                raise ValueError(f"action_bound must be > 0, got {action_bound}")
            self.register_buffer("rate_dims_R", torch.as_tensor(dims), persistent=False)
            self.register_buffer("rate_mean_R", torch.as_tensor(action_mean, dtype=torch.float32)[dims], persistent=False)
            self.register_buffer("rate_std_R", torch.as_tensor(action_std, dtype=torch.float32)[dims], persistent=False)
            self.action_bound = float(action_bound)
        if decoder_z not in ("input", "modulate"):
            raise ValueError(f"decoder_z must be 'input' or 'modulate', got {decoder_z!r}")
        if decoder_z == "modulate" and action_likelihood != "gaussian":
            raise ValueError("decoder_z='modulate' brings its own likelihood (a Gaussian plus a broad outlier "
                             f"component); it needs action_likelihood='gaussian', got {action_likelihood!r}")
        self.decoder_z, self.modulate_outliers = decoder_z, modulate_outliers
        if action_likelihood not in ("gaussian", "laplace", "mixture"):
            raise ValueError(f"action_likelihood must be 'gaussian', 'laplace' or 'mixture', got {action_likelihood!r}")
        if action_likelihood == "mixture" and mixture_k < 2:
            raise ValueError(f"mixture_k must be >= 2 for action_likelihood='mixture', got {mixture_k}")
        self.action_likelihood, self.mixture_k = action_likelihood, mixture_k
        if encoder not in ("transformer", "window_mean"):
            raise ValueError(f"encoder must be 'transformer' or 'window_mean', got {encoder!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if window_shared and encoder != "window_mean":
            raise ValueError(f"window_shared needs encoder='window_mean', got encoder={encoder!r}")
        self.encoder, self.window, self.window_shared = encoder, window, window_shared
        self.decoder_prev_action = decoder_prev_action
        self.decoder_state_dim = decoder_state_dim
        self.encoder_frames = encoder_frames
        self.code_dim, self.action_dim, self.z_dim, self.dim = code_dim, action_dim, z_dim, dim
        self.pool = GridPool(code_dim, dim, grid_tokens, heads)
        self.action_deltas = action_deltas
        step_in = dim + action_dim * (2 if action_deltas else 1)
        self.post_in = nn.Linear(step_in, dim)
        self.prior_in = nn.Linear(step_in, dim)
        if encoder == "transformer":
            self.post_tf = STTransformer(dim, depth, heads, mlp_ratio, causal=False, dropout=dropout)
            self.prior_tf = STTransformer(dim, depth, heads, mlp_ratio, causal=True, dropout=dropout)
        else:  # an MLP over each causal window of `window` steps, averaged over time
            self.post_local, self.prior_local = (
                nn.Sequential(nn.Linear(window * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.GELU())
                for _ in range(2))
        n_rate = len(self.rate_dims_R) if "rates" in self.stat_groups else 0
        head_in = dim + (self.stats_dim(action_dim, self.stat_groups, n_rate) if self.stat_groups else 0)
        self.post_head = nn.Linear(head_in, 2 * z_dim)
        self.prior_head = nn.Linear(head_in, 2 * z_dim)
        modulate = decoder_z == "modulate"
        self.decoder = nn.Sequential(
            nn.Linear(dim + decoder_state_dim + (0 if modulate else z_dim + (action_dim if decoder_prev_action else 0)),
                      decoder_hidden),
            nn.GELU(),
            nn.Linear(decoder_hidden, decoder_hidden),
            nn.GELU(),
            nn.Linear(decoder_hidden, action_dim if modulate else self._decoder_out(action_dim)),
        )
        if modulate:  # z -> [log-scale A, bias A, log-variance A, outlier logit, inertia logit], linear in z
            self.modulator = nn.Linear(z_dim, 3 * action_dim + 2)
            with torch.no_grad():
                self.modulator.bias.zero_()
                self.modulator.bias[3 * action_dim :] = -3.0  # few outliers, little inertia at the start
            if modulate_outliers:
                self.outlier_logvar_A = nn.Parameter(torch.full((action_dim,), 0.5))
        # p(a_t | z), p(da_t | z) without the observation: [mean A, log-var A, log Laplace scale A, log Gaussian scale A]
        self.marginal = nn.Linear(z_dim, 4 * action_dim) if marginal_head else None
        if self.marginal is not None:  # start at the standard normal / unit scales, gently tied to z
            with torch.no_grad():
                self.marginal.weight.mul_(0.1)
                self.marginal.bias.zero_()
        # p(a_t - a_{t-1} | z): per action dim, a categorical over the bins of ``change_edges``, logits linear in z
        # and, with ``level_edges``, p(|a_t| | z) the same way (how far the policy's actions reach: slow vs saturating)
        self.change = self.level = None
        if level_edges is not None and change_edges is None:
            raise ValueError("level_edges is part of the change term: it needs change_edges too")
        for name, edges in (("change", change_edges), ("level", level_edges)):
            if edges is None:
                continue
            e = torch.as_tensor(list(edges), dtype=torch.float32)
            if e.ndim != 1 or len(e) < 1 or not bool((e.diff() > 0).all()):
                raise ValueError(f"{name}_edges must be a non-empty increasing list of numbers, got {list(edges)}")
            self.register_buffer(f"{name}_edges_E", e, persistent=False)
            head = nn.Linear(z_dim, action_dim * (len(e) + 1))
            with torch.no_grad():
                head.weight.mul_(0.1)
                head.bias.zero_()
            setattr(self, name, head)
        if action_likelihood == "mixture":  # break the components' symmetry: each starts at its own width
            with torch.no_grad():
                bias_KP = rearrange(self.decoder[-1].bias, "(k p) -> k p", k=mixture_k)
                bias_KP[:, 1 + action_dim :] = torch.linspace(-6.0, 0.0, mixture_k)[:, None]

    def _decoder_out(self, action_dim: int) -> int:
        if self.action_likelihood == "mixture":  # per component: weight logit, mean [A], log-variance [A]
            return self.mixture_k * (1 + 2 * action_dim)
        return 2 * action_dim

    # -- pieces ---------------------------------------------------------------------------------
    def _check(self, codes_BThwC: torch.Tensor, actions_BTA: torch.Tensor) -> None:
        if codes_BThwC.ndim != 5 or codes_BThwC.shape[-1] != self.code_dim:
            raise ValueError(f"codes must be [B,T,h,w,{self.code_dim}], got {tuple(codes_BThwC.shape)}")
        if actions_BTA.ndim != 3 or actions_BTA.shape[-1] != self.action_dim:
            raise ValueError(f"actions must be [B,T,{self.action_dim}], got {tuple(actions_BTA.shape)}")
        if codes_BThwC.shape[:2] != actions_BTA.shape[:2]:
            raise ValueError(
                f"codes {tuple(codes_BThwC.shape[:2])} and actions {tuple(actions_BTA.shape[:2])} "
                "disagree on [B, T]"
            )

    def frame_features(self, codes_BThwC: torch.Tensor) -> torch.Tensor:
        """[B, T, h, w, C] code vectors -> [B, T, dim] per-frame features."""
        return self.pool(codes_BThwC)

    def _tokens(self, proj: nn.Linear, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor, time: bool = True) -> torch.Tensor:
        # without encoder_frames the posterior and prior read the actions alone (the decoder still sees o_t)
        parts = [feat_BTD if self.encoder_frames else torch.zeros_like(feat_BTD), actions_BTA]
        if self.action_deltas:  # a_t - a_{t-1} (0 at t = 0): jitter and outliers become visible per step
            parts.append(self._deltas(actions_BTA))
        x = proj(torch.cat(parts, dim=-1))
        if time:
            x = x + sinusoidal_time_BTD(x.shape[1], self.dim, x.device).to(x.dtype)
        return rearrange(x, "b t d -> b t 1 d")

    @staticmethod
    def _split(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = h.float().chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _windows(self, proj: nn.Linear, local: nn.Module, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor):
        """``window_mean``: the local MLP of each step's last ``window`` step tokens (zeros before the clip), [B,T,D]."""
        x_BTD = self._tokens(proj, feat_BTD, actions_BTA, time=False)[:, :, 0]
        pad = torch.cat([x_BTD.new_zeros(x_BTD.shape[0], self.window - 1, x_BTD.shape[2]), x_BTD], dim=1)
        win_BTWD = pad.unfold(1, self.window, 1)  # [B, T, D, W]: steps t-W+1 .. t
        return local(rearrange(win_BTWD, "b t d w -> b t (w d)"))

    @staticmethod
    def _deltas(actions_BTA: torch.Tensor) -> torch.Tensor:
        """a_t - a_{t-1} at every step, 0 at t = 0, [B, T, A]."""
        return torch.cat([torch.zeros_like(actions_BTA[:, :1]), actions_BTA.diff(dim=1)], dim=1)

    @staticmethod
    def stats_dim(action_dim: int, groups: tuple[str, ...] = DEFAULT_STAT_GROUPS, n_rate: int | None = None) -> int:
        """Width of ``pooled_stats`` for these groups: ``moments`` a, a^2, |a|, |da|, da^2 per dim; ``changes`` the
        one-hot bin of da over ``CHANGE_EDGES`` per dim; ``rates`` per rate dim the at-bound and near-zero
        indicators, then the jump indicator, the norm and its square over the rate dims; ``turns`` da_t * da_{t-1} and
        whether it is < 0 (a reversal) per dim; ``std`` the standard deviation of a per dim."""
        n_rate = action_dim if n_rate is None else n_rate
        width = {"moments": 5 * action_dim, "changes": action_dim * (len(CHANGE_EDGES) + 1), "rates": 2 * n_rate + 3,
                 "turns": 2 * action_dim, "std": action_dim}
        return sum(width[g] for g in groups)

    def step_stats(self, actions_BTA: torch.Tensor) -> torch.Tensor:
        """``encoder_stats``: fixed per-step action statistics whose running mean the z heads also read (``pooled_stats``
        adds the ``std`` group, which is no mean), [B, T, S - A with std].
        ``moments``: a, a^2, |a|, |da|, da^2 (da = a_t - a_{t-1}, 0 at t = 0); ``changes``: the one-hot bin of da over
        ``CHANGE_EDGES``; ``rates``, in raw units over ``rate_dims`` (a * std + mean): |a| at the bound
        (>= 0.999 ``action_bound``) and near zero (< 0.05 bound) per dim, a jump (max |da| > 0.5 bound), the norm and
        its square; ``turns`` da_t * da_{t-1} and its sign (< 0: the policy reversed). Their means are the moments,
        the change histogram, the saturation / rest / jump rates and the lag-1 autocovariance and reversal rate of
        the changes so far -- summary statistics that cannot over-fit the training episodes, beside the learned
        window features."""
        a = actions_BTA.float()
        da = self._deltas(a)
        parts = []
        if "moments" in self.stat_groups:
            parts += [a, a * a, a.abs(), da.abs(), da * da]
        if "changes" in self.stat_groups:
            edges = torch.as_tensor(CHANGE_EDGES, dtype=a.dtype, device=a.device)
            onehot = nn.functional.one_hot(torch.bucketize(da, edges), len(CHANGE_EDGES) + 1).to(a.dtype)
            parts.append(rearrange(onehot, "b t a k -> b t (a k)"))
        if "rates" in self.stat_groups:
            raw = a[..., self.rate_dims_R] * self.rate_std_R + self.rate_mean_R
            draw = self._deltas(raw)
            bound = self.action_bound
            norm = raw.norm(dim=-1, keepdim=True)
            parts += [(raw.abs() >= RATE_SATURATED * bound).to(a.dtype), (raw.abs() < RATE_NEAR_ZERO * bound).to(a.dtype),
                      (draw.abs().amax(-1, keepdim=True) > RATE_JUMP * bound).to(a.dtype), norm, norm * norm]
        if "turns" in self.stat_groups:
            turn = da * torch.cat([torch.zeros_like(da[:, :1]), da[:, :-1]], dim=1)  # da_t * da_{t-1}, 0 at t <= 1
            parts += [turn, (turn < 0).to(a.dtype)]
        return torch.cat(parts, dim=-1)

    def pooled_stats(self, actions_BTA: torch.Tensor, running: bool) -> torch.Tensor:
        """The z heads' fixed statistics: the (running, over steps <= t: [B, T, S]; else over the clip: [B, S]) mean
        of ``step_stats``, then with ``std`` the standard deviation of a per dim over the same steps."""
        mean = self._running_mean if running else (lambda x: x.mean(1))
        parts = [mean(self.step_stats(actions_BTA))] if set(self.stat_groups) - {"std"} else []
        if "std" in self.stat_groups:
            a = actions_BTA.float()
            parts.append((mean(a * a) - mean(a).square()).clamp_min(0).sqrt())
        return torch.cat(parts, dim=-1)

    def _with_stats(self, pooled: torch.Tensor, actions_BTA: torch.Tensor, running: bool) -> torch.Tensor:
        """The pooled window features, with ``encoder_stats`` followed by the fixed statistics (``pooled_stats``)."""
        if not self.stat_groups:
            return pooled
        return torch.cat([pooled.float(), self.pooled_stats(actions_BTA, running)], dim=-1)

    @staticmethod
    def _running_mean(h_BTD: torch.Tensor) -> torch.Tensor:
        """Row t: the mean of rows 0..t, [B, T, D]."""
        count = torch.arange(1, h_BTD.shape[1] + 1, device=h_BTD.device, dtype=h_BTD.dtype)[None, :, None]
        return h_BTD.cumsum(dim=1) / count

    def prior_pooled(self, codes_BThwC: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """``window_mean`` only: the prior's running mean of its window features over steps <= t, [B, T, dim] (with
        ``encoder_stats``, followed by the running action statistics: [B, T, dim + stats_dim]) -- what the prior's z
        head reads. A probe on it tells what the pooled statistics hold that the (KL-shaped) head leaves out."""
        if self.encoder != "window_mean":
            raise ValueError(f"prior_pooled needs encoder='window_mean', got encoder={self.encoder!r}")
        self._check(codes_BThwC, actions_BTA)
        return self._prior_running(self.frame_features(codes_BThwC), actions_BTA)

    def prior_from_pooled(self, pooled_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``window_mean``: the prior (mu_BTZ, logvar_BTZ) from ``prior_pooled``'s output -- its z head (with
        ``window_shared``, the posterior's), so a caller holding the pooled statistics need not run the encoder again."""
        return self._split((self.post_head if self.window_shared else self.prior_head)(pooled_BTD))

    def _prior_running(self, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """``window_mean``: the running mean of the prior's window features (with ``window_shared``, the posterior's
        window MLP: the prior is the posterior run on the prefix)."""
        proj, local = (self.post_in, self.post_local) if self.window_shared else (self.prior_in, self.prior_local)
        return self._with_stats(self._running_mean(self._windows(proj, local, feat_BTD, actions_BTA)), actions_BTA, True)

    def posterior_from_features(self, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor):
        if self.encoder == "window_mean":
            pooled = self._windows(self.post_in, self.post_local, feat_BTD, actions_BTA).mean(1)
            return self._split(self.post_head(self._with_stats(pooled, actions_BTA, False)))
        h = self.post_tf(self._tokens(self.post_in, feat_BTD, actions_BTA))[:, :, 0]
        return self._split(self.post_head(self._with_stats(h.mean(dim=1), actions_BTA, False)))

    def prior_from_features(self, feat_BTD: torch.Tensor, actions_BTA: torch.Tensor):
        if self.encoder == "window_mean":  # running mean over steps <= t: the posterior's estimate on the prefix
            # window_shared: literally the posterior run on the prefix (its window MLP and head)
            return self.prior_from_pooled(self._prior_running(feat_BTD, actions_BTA))
        h = self.prior_tf(self._tokens(self.prior_in, feat_BTD, actions_BTA))[:, :, 0]
        return self._split(self.prior_head(self._with_stats(h, actions_BTA, True)))

    def _decoder_raw(
        self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor | None, actions_BTA: torch.Tensor | None,
        state_BTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder MLP's output. With ``decoder_z='modulate'`` the MLP reads o_t (and the state) only -- neither
        z (pass None) nor a_{t-1}, which would tell it the policy's family without z."""
        parts = [feat_BTD]
        if self.decoder_state_dim:
            if state_BTS is None or state_BTS.shape[-1] != self.decoder_state_dim:
                got = None if state_BTS is None else tuple(state_BTS.shape)
                raise ValueError(f"decoder_state_dim={self.decoder_state_dim}: decode needs the clip's low-dimensional "
                                 f"state [B,T,{self.decoder_state_dim}], got {got}")
            parts.append(state_BTS.to(feat_BTD.dtype))
        if self.decoder_z == "input":  # 'modulate' brings a_{t-1} and z in after the MLP
            if self.decoder_prev_action:
                parts.append(self._prev_actions(actions_BTA).to(feat_BTD.dtype))
            parts.append(z_BTZ.to(feat_BTD.dtype))
        return self.decoder(torch.cat(parts, dim=-1)).float()

    def _prev_actions(self, actions_BTA: torch.Tensor | None) -> torch.Tensor:
        """a_{t-1} for every step of the clip (zeros at t = 0), [B, T, A]."""
        if actions_BTA is None:
            raise ValueError("decoder_prev_action=True: decode needs the clip's actions (for a_{t-1})")
        return torch.cat([torch.zeros_like(actions_BTA[:, :1]), actions_BTA[:, :-1]], dim=1)

    def _modulated(
        self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor | None,
        state_BTS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``decoder_z='modulate'`` as a mixture (log weights [B,T,K], means and log-variances [B,T,K,A]; K = 2,
        or K = 1 without ``modulate_outliers``). A base policy f(o_t) that sees neither z nor a_{t-1} gives the mean; z sets, through one linear
        map, only how this episode's policy departs from it: a_t ~ (1 - w) N(s * ((1 - alpha) f + alpha a_{t-1})
        + b, sigma^2) + w N(0, sigma_out^2), with per-dim scale s, bias b and sigma, outlier rate w and inertia
        alpha (with ``decoder_prev_action``, a_{t-1}'s only way in: a smooth or lagging policy follows its previous
        action). The scene cannot help the decoder through z, nor a_{t-1} tell it the policy without z, so z has
        nothing to carry but the policy's deviation parameters."""
        A = self.action_dim
        base_BTA = self._decoder_raw(feat_BTD, None, actions_BTA, state_BTS)
        m = self.modulator(z_BTZ.float())
        log_s, bias, logvar = m[..., :A], m[..., A : 2 * A], m[..., 2 * A : 3 * A]
        w_logit, inertia_logit = m[..., 3 * A], m[..., 3 * A + 1]
        if self.decoder_prev_action:
            alpha = torch.sigmoid(inertia_logit)[..., None]
            base_BTA = (1 - alpha) * base_BTA + alpha * self._prev_actions(actions_BTA).float()
        mu_BTA = log_s.clamp(-5.0, 3.0).exp() * base_BTA + bias
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        if not self.modulate_outliers:  # a single Gaussian: every departure from f must be explained through z
            return torch.zeros_like(w_logit)[..., None], mu_BTA[..., None, :], logvar[..., None, :]
        logw = torch.stack([nn.functional.logsigmoid(-w_logit), nn.functional.logsigmoid(w_logit)], dim=-1)
        mu = torch.stack([mu_BTA, torch.zeros_like(mu_BTA)], dim=-2)
        lv_out = self.outlier_logvar_A.float().clamp(LOGVAR_MIN, LOGVAR_MAX).expand_as(logvar)
        return logw, mu, torch.stack([logvar, lv_out], dim=-2)

    @property
    def _plain(self) -> bool:
        """One Gaussian (the default) or Laplace straight from the decoder MLP; otherwise a mixture from ``_components``."""
        return self.action_likelihood in ("gaussian", "laplace") and self.decoder_z == "input"

    def _components(
        self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor | None,
        state_BTS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture parameters (log weights, means, log-variances) for the 'mixture' likelihood or 'modulate'."""
        if self.decoder_z == "modulate":
            return self._modulated(feat_BTD, z_BTZ, actions_BTA, state_BTS)
        return self._mixture(self._decoder_raw(feat_BTD, z_BTZ, actions_BTA, state_BTS))

    def _mixture(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder output -> (log weights [B,T,K], means [B,T,K,A], log-variances [B,T,K,A])."""
        A = self.action_dim
        raw_BTKP = rearrange(raw, "b t (k p) -> b t k p", k=self.mixture_k)
        logw = raw_BTKP[..., 0].log_softmax(dim=-1)
        mu, logvar = raw_BTKP[..., 1 : 1 + A], raw_BTKP[..., 1 + A :]
        return logw, mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(
        self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor | None = None,
        state_BTS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pi(a_t | o_t, z): mean and log-variance of each action, [B, T, A] each (for a mixture, the
        mixture's own mean and variance). ``actions_BTA`` (the clip's actions) is needed only with
        ``decoder_prev_action``: the decoder then also sees a_{t-1} (zeros at t = 0), never a_t."""
        if self._plain:
            return self._split(self._decoder_raw(feat_BTD, z_BTZ, actions_BTA, state_BTS))
        logw, mu, logvar = self._components(feat_BTD, z_BTZ, actions_BTA, state_BTS)
        w = logw.exp()[..., None]
        mean = (w * mu).sum(-2)
        var = (w * (logvar.exp() + (mu - mean[..., None, :]) ** 2)).sum(-2)
        return mean, var.clamp_min(1e-8).log()

    def action_nll(
        self, feat_BTD: torch.Tensor, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor,
        state_BTS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-log pi(a_t | o_t, z) per step [B, T] (nats, over all action dims) and the decoder's mean
        action [B, T, A]. ``gaussian``: a diagonal Gaussian. ``laplace``: per-dim Laplace (the decoder's second
        output is still its log-variance, 2 b^2): its maximum-likelihood scale is the mean *absolute* residual, the
        statistic that tells rare large steps from Gaussian jitter of the same variance. ``mixture``: K diagonal Gaussians whose
        weights, means and variances all depend on z -- one component covers *all* of a step's action
        dims, so an epsilon-random step (every dim off at once) and per-dim Gaussian noise of the same
        variance have different likelihoods, which a single Gaussian cannot tell apart."""
        a = actions_BTA.float()
        if self._plain:
            mu, logvar = self._split(self._decoder_raw(feat_BTD, z_BTZ, actions_BTA, state_BTS))
            if self.action_likelihood == "laplace":
                return laplace_nll(a, mu, logvar).sum(-1), mu
            return gaussian_nll(a, mu, logvar).sum(-1), mu
        logw, mu, logvar = self._components(feat_BTD, z_BTZ, actions_BTA, state_BTS)
        comp_BTK = -gaussian_nll(a[..., None, :], mu, logvar).sum(-1)
        return -(logw + comp_BTK).logsumexp(dim=-1), (logw.exp()[..., None] * mu).sum(-2)

    def marginal_nll(self, z_BZ: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """-log p(a_t | z) - log p(a_t - a_{t-1} | z) per step [B, T] (the change term from t = 1), with no observation:
        the episode's action distribution as z alone describes it. a_t ~ N(mu, sigma^2); the change d ~ exp(-|d| / b
        - d^2 / (2 s^2)) / Z(b, s), a Laplace-Gaussian product whose sufficient statistics |d| and d^2 are what
        tells random jumps (heavy tails) from Gaussian jitter of the same variance. Every parameter is linear in z
        (scales floored at 0.01, normalised action units)."""
        if self.marginal is None:
            raise ValueError("marginal_nll needs marginal_head=True")
        A = self.action_dim
        mu, logvar, log_b, log_s = self.marginal(z_BZ.float()).float()[:, None].split(A, dim=-1)
        a = actions_BTA.float()
        nll_a = gaussian_nll(a, mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)).sum(-1)
        d = a.diff(dim=1)  # steps 1..T-1
        b, s = log_b.clamp(math.log(0.01), 3.0).exp(), log_s.clamp(math.log(0.01), 3.0).exp()
        # Z = int exp(-|d|/b - d^2/(2 s^2)) dd = sqrt(2 pi) s erfcx(s / (sqrt(2) b)), erfcx(x) = exp(x^2) erfc(x)
        log_z = 0.5 * math.log(2 * math.pi) + s.log() + torch.special.erfcx(s / (math.sqrt(2) * b)).log()
        nll_d = (d.abs() / b + d.pow(2) / (2 * s.pow(2)) + log_z).sum(-1)
        return nll_a + torch.cat([torch.zeros_like(nll_a[:, :1]), nll_d], dim=1)

    def change_nll(self, z_BTZ: torch.Tensor, actions_BTA: torch.Tensor) -> torch.Tensor:
        """-log p(bin of a_t - a_{t-1} | z_t) per step t >= 1, summed over action dims, [B, T-1] (nats). No observation and
        no a_{t-1} to explain the change away: only z can say how this policy's actions change from step to step -- how
        often it jumps, how far, how much it jitters (the histogram of changes tells epsilon-random steps from Gaussian
        noise of the same variance, and a smooth policy from both). The log-probabilities are linear in z, so z holds
        the episode's change histogram in a linearly readable form. With ``level_edges`` the histogram of |a_t| is
        scored too (the same way, from the same z): how far the policy's actions reach. ``z_BTZ`` [B, T, Z]: step t's z explains a_t - a_{t-1}
        (t = 0 is not scored)."""
        if self.change is None:
            raise ValueError("change_nll needs change_edges")
        a = actions_BTA.float()
        z = z_BTZ[:, 1:].float()
        nll = self._hist_nll(self.change, self.change_edges_E, z, a.diff(dim=1))
        if self.level is not None:
            nll = nll + self._hist_nll(self.level, self.level_edges_E, z, a[:, 1:].abs())
        return nll

    def _hist_nll(self, head: nn.Linear, edges_E: torch.Tensor, z_BTZ: torch.Tensor, x_BTA: torch.Tensor) -> torch.Tensor:
        """-log of each value's bin (edges: (lo, hi] per bin) under per-dim categoricals with logits head(z), summed over dims."""
        bins_BTA = torch.bucketize(x_BTA, edges_E.to(x_BTA.device))
        logits = rearrange(head(z_BTZ), "b t (a k) -> b t a k", a=self.action_dim)
        return -logits.log_softmax(-1).gather(-1, bins_BTA[..., None])[..., 0].sum(-1)

    # -- public API -----------------------------------------------------------------------------
    def posterior(self, codes_BThwC: torch.Tensor, actions_BTA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | tau_{0:T}) -> (mu_BZ, logvar_BZ), bidirectional over the whole segment."""
        self._check(codes_BThwC, actions_BTA)
        return self.posterior_from_features(self.frame_features(codes_BThwC), actions_BTA)

    def prior(self, codes_BThwC: torch.Tensor, actions_BTA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_t | tau_{0:t}) -> (mu_BTZ, logvar_BTZ); step t sees codes and actions at steps <= t only.
        The stage-3 behavior embedding is ``mu_BTZ``."""
        self._check(codes_BThwC, actions_BTA)
        return self.prior_from_features(self.frame_features(codes_BThwC), actions_BTA)

    def loss(
        self,
        codes_BThwC: torch.Tensor,
        actions_BTA: torch.Tensor,
        beta: float,
        free_bits: float = 0.0,
        sample: bool = True,
        kl_balance: float | None = None,
        state_BTS: torch.Tensor | None = None,
        prior_decode: float = 0.0,
        marginal_decode: float = 0.0,
        change_decode: float = 0.0,
        change_decode_prior: float = 0.0,
    ) -> BehaviorOutput:
        """Action NLL + beta * KL(q(z | tau_{0:T}) || p(z_t | tau_{0:t})), both averaged over B and t.

        ``prior_decode`` gamma (the hybrid objective of Sohn et al. 2015's CVAE, whose GSNN term decodes from the
        prior): adds gamma * mean_{t >= 1} -log pi(a_t | o_t, z_{t-1}), z_{t-1} drawn from the prior over the history
        *before* a_t (it has seen a_{t-1}, never a_t). The prior is then trained directly to summarise what the
        history says about how this policy acts next, not only to match the posterior through the KL.
        ``marginal_decode`` lambda (needs ``marginal_head``): adds lambda * mean_t ``marginal_nll`` of the posterior's z --
        z must also describe the episode's distribution of actions and action changes on its own, which o_t and a_{t-1}
        cannot explain away in the conditional decoder.
        ``change_decode`` / ``change_decode_prior`` (need ``change_edges``): add the weight times mean_{t >= 1}
        ``change_nll`` of the posterior's z / of the prior's z_{t-1} (which has seen a_{t-1}, never a_t): the
        histogram of the policy's action changes, read linearly from z. From the prior, the best z_{t-1} is the
        running histogram of the changes so far -- the causal statistic that names the policy family.

        ``free_bits`` (nats per z dimension): each dimension's batch-mean KL is floored at this value
        in the loss, so the optimiser gains nothing by pushing the posterior onto the prior below it.
        ``kl_balance`` alpha (KL balancing, as in DreamerV2): the KL term becomes
        alpha * KL(sg(q) || p_t) + (1 - alpha) * KL(q || sg(p_t)) -- the same value, but alpha > 0.5 lets
        the prior learn the posterior faster than the posterior is pulled towards the prior. None: plain KL.
        """
        self._check(codes_BThwC, actions_BTA)
        feat_BTD = self.frame_features(codes_BThwC)
        mu_q, logvar_q = self.posterior_from_features(feat_BTD, actions_BTA)
        mu_p, logvar_p = self.prior_from_features(feat_BTD, actions_BTA)
        T = actions_BTA.shape[1]
        z_BZ = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp() if sample else mu_q
        nll_BT, a_mu = self.action_nll(feat_BTD, z_BZ[:, None].expand(-1, T, -1), actions_BTA, state_BTS)
        nll = nll_BT.mean()
        mq, lq = mu_q[:, None], logvar_q[:, None]
        if kl_balance is None:
            kl_BTZ = gaussian_kl(mq, lq, mu_p, logvar_p)
        else:
            to_prior = gaussian_kl(mq.detach(), lq.detach(), mu_p, logvar_p)
            to_post = gaussian_kl(mq, lq, mu_p.detach(), logvar_p.detach())
            kl_BTZ = kl_balance * to_prior + (1 - kl_balance) * to_post
        kl_Z = kl_BTZ.mean(dim=(0, 1))
        kl_loss = kl_Z.clamp(min=free_bits).sum() if free_bits > 0 else kl_Z.sum()
        loss = nll + beta * kl_loss
        prior_nll = torch.zeros((), device=nll.device)
        z_prev_BTZ = None  # one draw of the prior's z_{t-1} at every step t for all the terms that read it
        if T > 1 and (prior_decode > 0 or change_decode_prior > 0):
            z_p = mu_p + torch.randn_like(mu_p) * (0.5 * logvar_p).exp() if sample else mu_p
            z_prev_BTZ = torch.cat([z_p[:, :1], z_p[:, :-1]], dim=1)  # step t reads z_{t-1}; step 0 is never scored
        if prior_decode > 0 and z_prev_BTZ is not None:  # z_{t-1} decodes a_t: the prior never sees the action it explains
            prior_nll = self.action_nll(feat_BTD, z_prev_BTZ, actions_BTA, state_BTS)[0][:, 1:].mean()
            loss = loss + prior_decode * prior_nll
        marginal_nll = torch.zeros((), device=nll.device)
        if marginal_decode > 0:
            marginal_nll = self.marginal_nll(z_BZ, actions_BTA).mean()
            loss = loss + marginal_decode * marginal_nll
        change_nll = torch.zeros((), device=nll.device)
        if change_decode > 0 and T > 1:
            c = self.change_nll(z_BZ[:, None].expand(-1, T, -1), actions_BTA).mean()
            change_nll = change_nll + c
            loss = loss + change_decode * c
        if change_decode_prior > 0 and z_prev_BTZ is not None:  # z_{t-1} from the prior explains a_t - a_{t-1}
            c = self.change_nll(z_prev_BTZ, actions_BTA).mean()
            change_nll = change_nll + c
            loss = loss + change_decode_prior * c
        with torch.no_grad():
            mse = (a_mu - actions_BTA).pow(2).mean()
            a_mu_p, _ = self.decode(feat_BTD, mu_p, actions_BTA, state_BTS)
            mse_p = (a_mu_p - actions_BTA).pow(2).mean()
        return BehaviorOutput(
            loss=loss,
            nll=nll,
            kl=kl_Z.sum(),
            kl_loss=kl_loss,
            action_mse=mse,
            action_mse_prior=mse_p,
            prior_nll=prior_nll,
            marginal_nll=marginal_nll,
            change_nll=change_nll,
            post_mu_BZ=mu_q,
            prior_mu_BTZ=mu_p,
        )
