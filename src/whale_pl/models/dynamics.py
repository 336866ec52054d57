"""Stage 3: the action- and behavior-conditioned ST-MaskGIT dynamics model over token grids.

Frames are grids of tokenizer ids ``[T, h, w]``. The shared ``STTransformer`` (spatial attention in
a frame, causal temporal attention across frames) runs over embedded ids; masked positions hold an
extra ``mask_id = codebook_size``. Slot t is conditioned on what led *into* frame t: the action
``a_{t-1}``, the behavior embedding ``z_{t-1}`` (prior mean of the frozen behavior model, switchable
off) and the clip's frame stride k (retracing clips compose k actions into one); slot 0 gets a
learned start vector instead of an action. The conditioning vector enters by ``injection``:

- ``"adanorm"``: modulates every LayerNorm of every block (scale, shift, gate; DiT-style);
- ``"additive"``: added to every token of the frame before the first block;
- ``"token"``: an extra spatial token per frame that the frame's tokens attend to.

Copy paths (both optional): ``prev_frame_input`` adds to each position the embedding of the id the
same position held one frame earlier; ``copy_logit`` adds a learned, position-wise gate g(h) to the
logit of that earlier id (a pointer-style copy prior). Most of a frame's tokens repeat from one
frame to the next, so with the copy logit the model starts at the copy-the-previous-frame baseline
and spends its capacity on what moves. ``change_input`` adds to each position an embedding of
whether its id differs from the one it held a frame earlier (same / changed / unknown: masked or no
earlier frame): a masked position then reads, through temporal and spatial attention, *where* the
previous frames moved, without having to learn the equality of two ids from their embeddings.

Change weighting (optional, ``change_weight`` w > 1): the training cross-entropy weights the few
targets whose id changes from the frame before by w, so the model learns motion sooner instead of
spending its first thousand steps on the copies. Weighting shifts what the model learns towards
"changed" by a factor w in odds; the logits correct for it exactly by adding log w to the logit of
the previous frame's id at every position (a fixed prior correction, as for any class-weighted
loss), so predictions and probabilities outside the training loss stay calibrated.

Code vectors (optional, ``code_dim > 0``): the frozen tokenizer's codebook ``[V, C]`` (set with
``set_code_vectors``) enters both ends — each id's embedding adds a projection of its code vector,
and the logits add a bilinear score between the latent and every code vector — so tokens that look
alike start out alike, instead of as 512 unrelated symbols each learned from its own examples.

Heads on the frame latent (mean over the frame's positions) predict the reward and success of the
transition into frame t (``rewards[t-1]``, ``success[t-1]``) and the low-dimensional state of frame t.

Generation (``imagine``) is frame by frame, a few MaskGIT steps per frame, reusing the temporal
keys/values of finished frames (``use_cache``). When a rollout outgrows ``max_frames`` the window
restarts from its last ``max_frames // 2`` frames (both with and without the cache, so they agree).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from whale_pl.models.maskgit import corrupt_tokens, maskgit_decode_frame, training_mask
from whale_pl.models.st_block import KV, STTransformer, append_kv

INJECTIONS = ("adanorm", "additive", "token")
ZFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DynamicsModel(nn.Module):
    """ST-MaskGIT world model: ``forward(ids_BThw, actions_BTA, z_BTZ) -> logits_BThwV``."""

    def __init__(
        self,
        codebook_size: int,
        grid_hw: tuple[int, int] | list[int],
        action_dim: int,
        behavior_dim: int = 0,
        state_dim: int = 0,
        dim: int = 256,
        depth: int = 8,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        max_frames: int = 16,
        max_stride: int = 4,
        injection: str = "adanorm",
        dropout: float = 0.0,
        prev_frame_input: bool = False,
        copy_logit: bool = False,
        copy_init: float = 4.0,
        code_dim: int = 0,
        change_input: bool = False,
        change_weight: float = 1.0,
        transition_rank: int = 0,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.num_tokens = self.grid_hw[0] * self.grid_hw[1]
        self.action_dim = action_dim
        self.behavior_dim = behavior_dim
        self.state_dim = state_dim
        self.max_frames = max_frames
        self.max_stride = max_stride
        self.injection = injection
        self.dim = dim

        self.tok_emb = nn.Embedding(codebook_size + 1, dim)
        # optional: each position also sees the id the same position held one frame earlier (a direct
        # copy path; index codebook_size + 1 = "no earlier frame in this window")
        self.prev_emb = None
        if prev_frame_input:
            self.prev_emb = nn.Embedding(codebook_size + 2, dim)
            nn.init.normal_(self.prev_emb.weight, std=0.02)
        # optional: same (0) / changed (1) / unknown (2) since the frame before, per position
        self.change_emb = None
        if change_input:
            if not prev_frame_input:
                raise ValueError("change_input needs prev_frame_input (it compares each id with the earlier one)")
            self.change_emb = nn.Embedding(3, dim)
            nn.init.normal_(self.change_emb.weight, std=0.02)
        if not change_weight > 0:
            raise ValueError(f"change_weight must be > 0, got {change_weight}")
        self.change_weight = float(change_weight)
        self.pos_s = nn.Parameter(torch.randn(self.num_tokens, dim) * 0.02)
        self.pos_t = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.act_mlp = nn.Sequential(nn.Linear(action_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.beh_proj = nn.Linear(behavior_dim, dim) if behavior_dim > 0 else None
        self.stride_emb = nn.Embedding(max_stride + 1, dim)
        self.start = nn.Parameter(torch.zeros(dim))
        self.cond_norm = nn.LayerNorm(dim)
        if injection == "token":
            self.cond_pos = nn.Parameter(torch.randn(dim) * 0.02)
        self.transformer = STTransformer(
            dim, depth, heads, mlp_ratio, causal=True,
            cond_dim=dim if injection == "adanorm" else None, dropout=dropout,
        )
        self.logits_head = nn.Linear(dim, codebook_size)
        self.code_dim = code_dim
        self.code_in = self.code_out = None
        if code_dim > 0:
            # the codebook itself is not a parameter of this model: the frozen tokenizer's, set by the owner
            self.register_buffer("code_vectors", torch.zeros(codebook_size, code_dim), persistent=False)
            self.code_in = nn.Linear(code_dim, dim, bias=False)
            self.code_out = nn.Linear(dim, code_dim, bias=False)
            self.code_scale = nn.Parameter(torch.tensor(1.0))
        # optional: per (position, previous id), a learned rank-r map from the trunk's state to the
        # code-space query -- a factorised per-position transition table. An embedding row is trained
        # by every example of its (position, id) pair, so it learns "what this patch becomes" far
        # sooner than the shared trunk does (benchmarks/dynamics_budget.py, docs/findings.md)
        if isinstance(transition_rank, bool) or not isinstance(transition_rank, int) or transition_rank < 0:
            raise ValueError(f"transition_rank must be an int >= 0, got {transition_rank!r}")
        self.transition_rank = transition_rank
        self.trans = self.trans_in = None
        if transition_rank > 0:
            if code_dim <= 0:
                raise ValueError("transition_rank > 0 needs code_dim > 0 (code_embed): it adds to the code-space query")
            self.trans = nn.Embedding(self.num_tokens * codebook_size, code_dim * transition_rank)
            nn.init.zeros_(self.trans.weight)  # starts as the plain model
            self.trans_in = nn.Linear(dim, transition_rank)
        self.copy_gate = None
        if copy_logit:
            self.copy_gate = nn.Linear(dim, 1)
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.constant_(self.copy_gate.bias, copy_init)
        self.frame_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.reward_head = nn.Linear(dim, 1)
        self.success_head = nn.Linear(dim, 1)
        self.state_head = nn.Linear(dim, state_dim) if state_dim > 0 else None

    def set_code_vectors(self, code_vectors_VC: torch.Tensor) -> None:
        """Install the tokenizer's codebook ``[V, C]`` (unit code vectors) for ``code_dim > 0``."""
        if self.code_in is None:
            raise ValueError("this dynamics model was built with code_dim=0: it takes no code vectors")
        if tuple(code_vectors_VC.shape) != (self.codebook_size, self.code_dim):
            raise ValueError(f"code vectors {tuple(code_vectors_VC.shape)} != (codebook_size, code_dim) = "
                             f"{(self.codebook_size, self.code_dim)}")
        self.code_vectors.copy_(code_vectors_VC.detach().to(self.code_vectors))

    def embed_ids(self, ids_BTS: torch.Tensor) -> torch.Tensor:
        """Input embedding of ids (``mask_id`` included): learned, plus the code vector's projection."""
        x = self.tok_emb(ids_BTS)
        if self.code_in is not None:
            known = ids_BTS < self.codebook_size
            vec = self.code_vectors[ids_BTS.clamp(max=self.codebook_size - 1)] * known.unsqueeze(-1)
            x = x + self.code_in(vec.to(x.dtype))
        return x

    # ------------------------------------------------------------------ building blocks
    @property
    def uses_behavior(self) -> bool:
        return self.beh_proj is not None

    def _check_inputs(self, actions_BTA: torch.Tensor, z_BTZ: torch.Tensor | None) -> None:
        if actions_BTA.shape[-1] != self.action_dim:
            raise ValueError(f"actions have {actions_BTA.shape[-1]} dims, the model was built for {self.action_dim}")
        if self.uses_behavior:
            if z_BTZ is None:
                raise ValueError("this dynamics model is behavior-conditioned: pass z (behavior_dim="
                                 f"{self.behavior_dim}); build it with behavior_dim=0 for the ablation")
            if z_BTZ.shape[-1] != self.behavior_dim:
                raise ValueError(f"z has {z_BTZ.shape[-1]} dims, the model was built for {self.behavior_dim}")
        elif z_BTZ is not None:
            raise ValueError("this dynamics model has behavior-conditioning off (behavior_dim=0) but got z")

    def condition(
        self,
        act_in_BTA: torch.Tensor,
        z_in_BTZ: torch.Tensor | None,
        stride_B: torch.Tensor | None,
        first_is_start: bool,
    ) -> torch.Tensor:
        """Per-slot conditioning ``[B, T, D]`` from the action/behavior leading INTO each slot;
        with ``first_is_start`` slot 0 takes the learned start vector (there is no action into it)."""
        B, T, _ = act_in_BTA.shape
        c = self.act_mlp(act_in_BTA)
        if self.beh_proj is not None:
            assert z_in_BTZ is not None
            c = c + self.beh_proj(z_in_BTZ)
        if first_is_start:
            c = torch.cat([self.start.expand(B, 1, -1), c[:, 1:]], dim=1)
        if stride_B is None:
            stride_B = torch.ones(B, dtype=torch.long, device=act_in_BTA.device)
        if int(stride_B.max()) > self.max_stride or int(stride_B.min()) < 1:
            raise ValueError(f"frame stride must be in [1, {self.max_stride}], got {stride_B.tolist()}")
        c = c + self.stride_emb(stride_B.long()).unsqueeze(1)
        return self.cond_norm(c)

    @staticmethod
    def shift_in(x_BTX: torch.Tensor | None) -> torch.Tensor | None:
        """Align per-frame inputs (``x[t]`` at frame t) to slots (slot t gets ``x[t-1]``)."""
        if x_BTX is None:
            return None
        return torch.cat([torch.zeros_like(x_BTX[:, :1]), x_BTX[:, :-1]], dim=1)

    def trunk(
        self,
        ids_BTS: torch.Tensor,
        cond_BTD: torch.Tensor,
        t0: int = 0,
        kv_cache: list[KV] | None = None,
        return_kv: bool = False,
        prev_ids_BS: torch.Tensor | None = None,
        slots_T: torch.Tensor | None = None,
        prev_BTS: torch.Tensor | None = None,
        temporal_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV] | None]:
        """Hidden states ``[B, T, S, D]`` of frames at window positions ``t0 .. t0+T-1``.
        ``prev_ids_BS``: ids of the frame before the first of these (None: none in the window);
        used only with ``prev_frame_input``. Two-stream training passes explicit window positions
        ``slots_T``, earlier-frame ids ``prev_BTS`` and a ``temporal_mask`` instead."""
        B, T, S = ids_BTS.shape
        if slots_T is None:
            if t0 + T > self.max_frames:
                raise ValueError(f"window of {t0 + T} frames exceeds max_frames={self.max_frames}")
            pos_t = self.pos_t[t0 : t0 + T]
        else:
            if int(slots_T.max()) >= self.max_frames:
                raise ValueError(f"window of {int(slots_T.max()) + 1} frames exceeds max_frames={self.max_frames}")
            pos_t = self.pos_t[slots_T]
        x = self.embed_ids(ids_BTS) + self.pos_s + pos_t[:, None]
        if self.prev_emb is not None:
            prev = self.prev_ids(ids_BTS, prev_ids_BS) if prev_BTS is None else prev_BTS
            x = x + self.prev_emb(prev)
            if self.change_emb is not None:
                x = x + self.change_emb(self.change_flags(ids_BTS, prev))
        cond = None
        if self.injection == "adanorm":
            cond = cond_BTD
        elif self.injection == "additive":
            x = x + cond_BTD.unsqueeze(2)
        else:
            x = torch.cat([(cond_BTD + self.cond_pos).unsqueeze(2), x], dim=2)
        out = self.transformer(x, cond, kv_cache=kv_cache, return_kv=return_kv, temporal_mask=temporal_mask)
        h, kv = (out if return_kv else (out, None))
        if self.injection == "token":
            h = h[:, :, 1:]
        return h, kv

    def prev_ids(self, ids_BTS: torch.Tensor, prev_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Ids each slot's positions held one frame earlier ``[B, T, S]`` (``codebook_size + 1`` where
        there is no earlier frame in the window; ``mask_id`` where the earlier frame is masked)."""
        first = torch.full_like(ids_BTS[:, 0], self.codebook_size + 1) if prev_ids_BS is None else prev_ids_BS
        return torch.cat([first.unsqueeze(1), ids_BTS[:, :-1]], dim=1)

    @property
    def copy_bias(self) -> float:
        """log ``change_weight``: added to the previous id's logit, it undoes the weighting's shift of the odds."""
        return math.log(self.change_weight)

    def change_flags(self, ids_BTS: torch.Tensor, prev_BTS: torch.Tensor) -> torch.Tensor:
        """0 where a position holds the id it held a frame earlier, 1 where that id changed, 2 where
        either is unknown (masked, or no earlier frame in the window)."""
        V = self.codebook_size
        unknown = (ids_BTS >= V) | (prev_BTS >= V)
        return torch.where(unknown, 2, (ids_BTS != prev_BTS).long())

    def token_logits(self, h_BTSD: torch.Tensor, prev_ids_BTS: torch.Tensor | None = None,
                     raw: bool = False) -> torch.Tensor:
        """Token logits ``[B, T, S, V]``; with ``copy_logit`` the gate g(h) is added to the logit of
        the id the position held one frame earlier (nothing where that id is unknown or masked), and
        with ``change_weight`` w the prior correction log w too, unless ``raw`` (the training loss)."""
        logits = self.logits_head(h_BTSD)
        if self.code_out is not None:
            q = self.code_out(h_BTSD)
            if self.trans is not None and prev_ids_BTS is not None:
                q = q + self.transition_query(h_BTSD, prev_ids_BTS).to(q.dtype)
            logits = logits + self.code_scale * (q @ self.code_vectors.to(q.dtype).T)
        bias = 0.0 if raw else self.copy_bias
        if prev_ids_BTS is None:
            return logits
        bonus = bias if self.copy_gate is None else self.copy_gate(h_BTSD).to(logits.dtype) + bias
        return self.add_at_prev(logits, prev_ids_BTS, bonus)

    def transition_query(self, h_BTSD: torch.Tensor, prev_ids_BTS: torch.Tensor) -> torch.Tensor:
        """``[B, T, S, code_dim]``: the (position, previous id) row of the transition table, a
        ``code_dim x r`` map, applied to an r-dim projection of the trunk's state; zero where the
        previous id is unknown or masked (>= V)."""
        V, S = self.codebook_size, h_BTSD.shape[2]
        idx_BTS = torch.arange(S, device=h_BTSD.device) * V + prev_ids_BTS.clamp(max=V - 1)
        table_BTSCR = rearrange(self.trans(idx_BTS), "b t s (c r) -> b t s c r", r=self.transition_rank)
        proj_BTSR = self.trans_in(h_BTSD).to(table_BTSCR.dtype)
        q_BTSC = torch.einsum("btscr,btsr->btsc", table_BTSCR, proj_BTSR)
        return q_BTSC * (prev_ids_BTS < V).unsqueeze(-1).to(q_BTSC.dtype)

    def add_at_prev(self, logits_NV: torch.Tensor, prev_ids_N: torch.Tensor,
                    bonus: torch.Tensor | float) -> torch.Tensor:
        """``logits [..., V]`` with ``bonus`` (a float, or ``[..., 1]``) added at each position's previous id,
        nowhere the previous id is unknown or masked (>= V)."""
        if isinstance(bonus, float) and bonus == 0.0:
            return logits_NV
        V = self.codebook_size
        known = (prev_ids_N < V).unsqueeze(-1).to(logits_NV.dtype)
        return logits_NV.scatter_add(-1, prev_ids_N.clamp(max=V - 1).unsqueeze(-1), bonus * known)

    def heads(self, h_BTSD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reward, success logit and state predicted from each frame's latent."""
        f = self.frame_head(h_BTSD.mean(dim=2))
        out = {
            "frame_feat": f,
            "reward": self.reward_head(f).squeeze(-1),
            "success_logit": self.success_head(f).squeeze(-1),
        }
        if self.state_head is not None:
            out["state"] = self.state_head(f)
        return out

    # ------------------------------------------------------------------ training
    def forward(
        self,
        ids_BThw: torch.Tensor,
        actions_BTA: torch.Tensor,
        z_BTZ: torch.Tensor | None = None,
        stride_B: torch.Tensor | None = None,
        copy_src_BThw: torch.Tensor | None = None,
        raw: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``[B, T, h, w, V]`` for every position of ``ids_BThw`` (which may hold ``mask_id``)
        and the head outputs. ``actions[:, t]``/``z[:, t]`` are taken at frame t (lead to t+1).
        ``copy_src_BThw``: the complete frames the copy logit of slot t reads frame t-1 from (in
        training the unmasked input, as at inference where the previous frame is always whole);
        default ``ids_BThw``. ``raw``: without the ``change_weight`` correction (for the training loss)."""
        self._check_inputs(actions_BTA, z_BTZ)
        B, T, hh, ww = ids_BThw.shape
        cond = self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B, first_is_start=True)
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        h, _ = self.trunk(ids, cond)
        src = ids if copy_src_BThw is None else rearrange(copy_src_BThw, "b t h w -> b t (h w)")
        logits = rearrange(self.token_logits(h, self.prev_ids(src), raw=raw), "b t (h w) v -> b t h w v", h=hh)
        return logits, self.heads(h)

    def training_losses(
        self,
        ids_BThw: torch.Tensor,
        actions_BTA: torch.Tensor,
        z_BTZ: torch.Tensor | None,
        rewards_BT: torch.Tensor,
        success_BT: torch.Tensor,
        state_BTS: torch.Tensor | None = None,
        stride_B: torch.Tensor | None = None,
        context_frames: int = 1,
        corrupt_prob: float = 0.0,
        generator: torch.Generator | None = None,
        max_context_frames: int | None = None,
        history: str = "masked",
        full_mask_prob: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """MaskGIT loss: cross-entropy on masked (and corrupted) positions of future frames, plus
        reward (MSE), success (BCE) and state (MSE) head losses. Returns the parts and ``acc``.

        ``history="masked"``: one pass over the clip with every future frame partly masked, so a
        frame's history is itself partly masked. ``history="clean"``: two streams in one pass, the
        clean clip and a partly masked copy of frames ``context_frames..T-1``; masked frame t attends
        (in time) to the clean frames before t and to itself only, so every predicted frame sees a
        whole, true history, as at inference (``teacher_forced``, ``imagine``). It costs about twice
        the tokens; the heads read the clean stream (as ``imagine`` reads finished frames).

        ``max_context_frames``: each clip draws its number of clean context frames uniformly from
        ``[context_frames, max_context_frames]`` (clamped to T-1), so the first masked frame of a
        clip sees a fully clean history, as every frame does at inference (teacher-forced and in
        rollouts); later frames see masked histories, as in plain per-frame MaskGIT training.
        ``full_mask_prob``: share of future frames masked whole instead of at a cosine-schedule ratio.

        With ``change_weight`` w the cross-entropy (on the raw logits) is a weighted mean in which
        targets whose true id differs from the one a frame earlier count w times."""
        if history == "clean":
            return self._two_stream_losses(ids_BThw, actions_BTA, z_BTZ, rewards_BT, success_BT, state_BTS,
                                           stride_B, context_frames, corrupt_prob, generator, full_mask_prob)
        if history != "masked":
            raise ValueError(f"history must be 'masked' or 'clean', got {history!r}")
        B, T, hh, ww = ids_BThw.shape
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        ctx: int | torch.Tensor = context_frames
        if max_context_frames is not None and max_context_frames > context_frames:
            hi = min(max_context_frames, T - 1)
            ctx = torch.randint(context_frames, hi + 1, (B,), generator=generator).to(ids.device)
        mask = training_mask(B, T, hh * ww, ctx, ids.device, generator, full_mask_prob)
        inp, hit = corrupt_tokens(ids, mask, ctx, corrupt_prob, self.codebook_size, generator)
        whole = rearrange(inp, "b t (h w) -> b t h w", h=hh)  # corrupted but unmasked: the copy source
        inp = inp.masked_fill(mask, self.mask_id)
        logits, heads = self(rearrange(inp, "b t (h w) -> b t h w", h=hh), actions_BTA, z_BTZ, stride_B, whole,
                             raw=True)
        logits = rearrange(logits, "b t h w v -> b t (h w) v")
        target = mask | hit
        ce = self._weighted_ce(logits[target], ids[target], self.prev_ids(ids)[target])
        src_prev = self.prev_ids(rearrange(whole, "b t h w -> b t (h w)"))  # what token_logits corrects at
        out = {"ce": ce, "acc": self._corrected_acc(logits[mask], src_prev[mask], ids[mask])}
        out.update(self._head_losses(heads, rewards_BT, success_BT, state_BTS))
        return out

    def _weighted_ce(self, logits_NV: torch.Tensor, target_N: torch.Tensor, prev_N: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; with ``change_weight`` w, targets that differ from the previous frame's id count w times."""
        if self.change_weight == 1.0:
            return F.cross_entropy(logits_NV.float(), target_N)
        w = torch.where(target_N != prev_N, self.change_weight, 1.0)
        return (F.cross_entropy(logits_NV.float(), target_N, reduction="none") * w).sum() / w.sum()

    def _corrected_acc(self, raw_logits_NV: torch.Tensor, src_prev_N: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
        """Accuracy of the predictions every caller outside the loss sees (raw logits + the log w correction)."""
        pred = self.add_at_prev(raw_logits_NV, src_prev_N, self.copy_bias).argmax(-1)
        return (pred == target_N).float().mean()

    def _head_losses(self, heads: dict[str, torch.Tensor], rewards_BT: torch.Tensor, success_BT: torch.Tensor,
                     state_BTS: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {"reward": F.mse_loss(heads["reward"][:, 1:].float(), rewards_BT[:, :-1].float()),
               "success": F.binary_cross_entropy_with_logits(heads["success_logit"][:, 1:].float(),
                                                             success_BT[:, :-1].float())}
        if self.state_head is not None and state_BTS is not None and state_BTS.shape[-1] > 0:
            if state_BTS.shape[-1] != self.state_dim:
                raise ValueError(f"batch state has {state_BTS.shape[-1]} dims, the model was built for {self.state_dim}")
            out["state"] = F.mse_loss(heads["state"].float(), state_BTS.float())
        return out

    @staticmethod
    def two_stream_mask(T: int, first: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Temporal attention mask ``[T + Q, T + Q]`` (True = may attend) for the clean clip (frames
        0..T-1, causal) followed by ``Q = T - first`` masked copies of frames first..T-1, each of
        which sees the clean frames before it and itself."""
        Q = T - first
        m = torch.zeros(T + Q, T + Q, dtype=torch.bool, device=device)
        m[:T, :T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        for j in range(Q):
            t = first + j
            m[T + j, :t] = True
            m[T + j, T + j] = True
        return m

    def _two_stream_losses(self, ids_BThw, actions_BTA, z_BTZ, rewards_BT, success_BT, state_BTS, stride_B,
                           context_frames, corrupt_prob, generator, full_mask_prob=0.0) -> dict[str, torch.Tensor]:
        self._check_inputs(actions_BTA, z_BTZ)
        B, T, hh, ww = ids_BThw.shape
        c = int(context_frames)
        if not 1 <= c < T:
            raise ValueError(f"context_frames must be in [1, T-1={T - 1}], got {c}")
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        Q = T - c
        tgt = ids[:, c:]
        mask = training_mask(B, Q, hh * ww, 0, ids.device, generator, full_mask_prob)
        inp, hit = corrupt_tokens(tgt, mask, 0, corrupt_prob, self.codebook_size, generator)
        inp = inp.masked_fill(mask, self.mask_id)
        logits, heads = self.two_stream(ids, inp, actions_BTA, z_BTZ, stride_B, raw=True)
        target = mask | hit
        prev = self.prev_ids(ids)[:, c:]  # the clean frame before each query: copy source and change reference
        out = {"ce": self._weighted_ce(logits[target], tgt[target], prev[target]),
               "acc": self._corrected_acc(logits[mask], prev[mask], tgt[mask])}
        out.update(self._head_losses(heads, rewards_BT, success_BT, state_BTS))
        return out

    def two_stream(self, ids_BTS: torch.Tensor, query_BQS: torch.Tensor, actions_BTA: torch.Tensor,
                   z_BTZ: torch.Tensor | None, stride_B: torch.Tensor | None = None, raw: bool = False,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``[B, Q, S, V]`` of the last Q frames of the clean clip ``ids_BTS`` from their
        partly masked versions ``query_BQS``, each given the clean frames before it (one pass), and
        the heads of the clean frames."""
        B, T, S = ids_BTS.shape
        Q = query_BQS.shape[1]
        c = T - Q
        cond = self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B, first_is_start=True)
        slots = torch.cat([torch.arange(T), torch.arange(c, T)]).to(ids_BTS.device)
        clean_prev = self.prev_ids(ids_BTS)
        h, _ = self.trunk(torch.cat([ids_BTS, query_BQS], 1), torch.cat([cond, cond[:, c:]], 1), slots_T=slots,
                          prev_BTS=torch.cat([clean_prev, clean_prev[:, c:]], 1),
                          temporal_mask=self.two_stream_mask(T, c, ids_BTS.device))
        return self.token_logits(h[:, T:], clean_prev[:, c:], raw=raw), self.heads(h[:, :T])

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def teacher_forced(
        self,
        ids_BThw: torch.Tensor,
        actions_BTA: torch.Tensor,
        z_BTZ: torch.Tensor | None = None,
        stride_B: torch.Tensor | None = None,
        given_BThw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T-1, h, w, V]`` for frames 1..T-1, each predicted in one step from a fully
        masked frame given the clean ground-truth frames before it (the inference situation).
        ``given_BThw`` (bool, frames 1..T-1): those positions of each predicted frame hold their true
        id instead of the mask (a MaskGIT step after some of the frame is decoded)."""
        self._check_inputs(actions_BTA, z_BTZ)
        B, T, hh, ww = ids_BThw.shape
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        cond = self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B, first_is_start=True)
        _, kv = self.trunk(ids, cond, return_kv=True)
        query = torch.full_like(ids[:, 1:], self.mask_id)
        if given_BThw is not None:
            if tuple(given_BThw.shape) != (B, T - 1, hh, ww):
                raise ValueError(f"given_BThw must be [B, T-1, h, w] = {(B, T - 1, hh, ww)}, got {tuple(given_BThw.shape)}")
            given = rearrange(given_BThw, "b t h w -> b t (h w)")
            query = torch.where(given, ids[:, 1:], query)
        outs = []
        for t in range(1, T):
            past = [(k[:, :, :t], v[:, :, :t]) for k, v in kv]
            h, _ = self.trunk(query[:, t - 1 : t], cond[:, t : t + 1], t0=t, kv_cache=past, prev_ids_BS=ids[:, t - 1])
            outs.append(self.token_logits(h, ids[:, t - 1 : t]))
        logits = torch.cat(outs, dim=1)
        return rearrange(logits, "b t (h w) v -> b t h w v", h=hh)

    @torch.no_grad()
    def predict_next(
        self,
        context_ids_BChw: torch.Tensor,
        actions_BCA: torch.Tensor,
        z_BCZ: torch.Tensor | None = None,
        stride_B: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One-step prediction of the frame after the context (for retracing-rollout): per-position
        token distributions ``probs_BhwV`` and latent features ``features_BhwD`` of the next frame,
        from a fully masked next frame, given ``actions[:, -1]`` (possibly a composed action over
        ``stride`` steps; then the context frames should be strided by the same k)."""
        self._check_inputs(actions_BCA, z_BCZ)
        B, C, hh, ww = context_ids_BChw.shape
        if actions_BCA.shape[1] != C:
            raise ValueError(f"predict_next needs one action per context frame: {actions_BCA.shape[1]} != {C}")
        ids = rearrange(context_ids_BChw, "b t h w -> b t (h w)")
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.mask_id)], dim=1)
        act_in = torch.cat([torch.zeros_like(actions_BCA[:, :1]), actions_BCA], dim=1)
        z_in = None if z_BCZ is None else torch.cat([torch.zeros_like(z_BCZ[:, :1]), z_BCZ], dim=1)
        t0 = max(0, C + 1 - self.max_frames)
        if t0:  # keep the last max_frames slots; the window restarts at its first frame
            ids, act_in = ids[:, t0:], act_in[:, t0:]
            z_in = None if z_in is None else z_in[:, t0:]
        cond = self.condition(act_in, z_in, stride_B, first_is_start=True)
        h, _ = self.trunk(ids, cond)
        last = h[:, -1]
        heads = self.heads(h[:, -1:])
        logits = self.token_logits(h[:, -1:], ids[:, -2:-1])[:, 0]
        return {
            "logits_BhwV": rearrange(logits, "b (h w) v -> b h w v", h=hh),
            "probs_BhwV": rearrange(logits.float().softmax(-1), "b (h w) v -> b h w v", h=hh),
            "features_BhwD": rearrange(last, "b (h w) d -> b h w d", h=hh),
            "reward_B": heads["reward"][:, 0],
            "success_B": heads["success_logit"][:, 0].sigmoid(),
            **({"state_BS": heads["state"][:, 0]} if "state" in heads else {}),
        }

    @torch.no_grad()
    def imagine(
        self,
        context_ids_BChw: torch.Tensor,
        actions_BTA: torch.Tensor,
        z: torch.Tensor | ZFn | None = None,
        horizon: int | None = None,
        steps: int = 4,
        temperature: float = 1.0,
        stride_B: torch.Tensor | None = None,
        use_cache: bool = True,
        return_probs: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Roll the model out frame by frame from ``context_ids_BChw``.

        ``actions_BTA[:, t]`` is taken at frame t counted from the first context frame; ``horizon``
        frames are generated (default ``T - C + 1``). ``z`` is the behavior embedding, either a tensor
        ``[B, >=C+horizon-1, Z]`` aligned like the actions, or a callable ``z_fn(ids_BThw, actions_BTA)
        -> z_BTZ`` (the frozen causal prior) that is re-evaluated on the growing history. Returns
        ``ids_BThw`` (generated frames), ``token_prob_BThw`` (probability of each chosen token),
        ``reward_BT``, ``success_BT`` (probability), ``state_BTS`` (if the model has a state head)
        and, with ``return_probs``, ``probs_BThwV`` (each position's distribution when it was fixed).
        """
        B, C, hh, ww = context_ids_BChw.shape
        S = hh * ww
        if horizon is None:
            horizon = actions_BTA.shape[1] - C + 1
        if horizon < 1 or actions_BTA.shape[1] < C + horizon - 1:
            raise ValueError(f"need >= C + horizon - 1 = {C + horizon - 1} actions, got {actions_BTA.shape[1]}")
        if actions_BTA.shape[-1] != self.action_dim:
            raise ValueError(f"actions have {actions_BTA.shape[-1]} dims, the model was built for {self.action_dim}")
        if self.uses_behavior and z is None:
            raise ValueError("this dynamics model is behavior-conditioned: pass z (a tensor or the prior as a callable)")
        if not self.uses_behavior and z is not None:
            raise ValueError("this dynamics model has behavior-conditioning off (behavior_dim=0) but got z")
        if C > self.max_frames - 1:
            raise ValueError(f"context of {C} frames leaves no room in max_frames={self.max_frames}")
        device = context_ids_BChw.device
        all_ids = rearrange(context_ids_BChw, "b t h w -> b t (h w)")
        z_rows: list[torch.Tensor] = []  # z at each frame so far (only for behavior models)

        def z_at(n: int) -> torch.Tensor | None:
            """z of frame n (the one leading into frame n+1), from history ``<= n``."""
            if z is None:
                return None
            if torch.is_tensor(z):
                return z[:, n]
            while len(z_rows) <= n:
                m = len(z_rows)
                ids_hist = rearrange(all_ids[:, : m + 1], "b t (h w) -> b t h w", h=hh)
                z_rows.append(z(ids_hist, actions_BTA[:, : m + 1])[:, -1])
            return z_rows[n]

        def cond_of(frames: range) -> torch.Tensor:
            """Conditioning of a window of global frames; its first slot takes the start vector, as
            slot 0 of a training clip does."""
            acts = torch.stack([actions_BTA[:, n - 1] if n > 0 else torch.zeros_like(actions_BTA[:, 0]) for n in frames], 1)
            zs = None
            if self.uses_behavior:
                zs = torch.stack([z_at(n - 1) if n > 0 else torch.zeros(B, self.behavior_dim, device=device)
                                  for n in frames], 1)
            return self.condition(acts, zs, stride_B, first_is_start=True)

        start = 0  # global index of the window's first frame
        cache: list[KV] | None = None
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "prob", "probs", "reward", "success", "state")}
        cache_len = 0
        for n in range(C, C + horizon):
            if n - start + 1 > self.max_frames:  # window full: restart it from its recent frames
                start = n + 1 - max(1, self.max_frames // 2)
                cache, cache_len = None, 0
            window = range(start, n + 1)
            cond_w = cond_of(window)
            if use_cache:
                if cache is None or cache_len < n - start:
                    # (re)prime the cache with the finished frames of the window
                    _, cache = self.trunk(all_ids[:, start:n], cond_w[:, :-1], t0=0, return_kv=True)
                    cache_len = n - start
                t_slot = n - start
                prev = all_ids[:, n - 1] if n - 1 >= start else None

                def logits_fn(ids_BS: torch.Tensor) -> torch.Tensor:
                    h, _ = self.trunk(ids_BS.unsqueeze(1), cond_w[:, -1:], t0=t_slot, kv_cache=cache, prev_ids_BS=prev)
                    return self.token_logits(h, None if prev is None else prev.unsqueeze(1))[:, 0]
            else:
                def logits_fn(ids_BS: torch.Tensor) -> torch.Tensor:
                    seq = torch.cat([all_ids[:, start:n], ids_BS.unsqueeze(1)], dim=1)
                    h, _ = self.trunk(seq, cond_w)
                    return self.token_logits(h[:, -1:], self.prev_ids(seq)[:, -1:])[:, 0]

            ids_BS, prob_BS, probs_BSV = maskgit_decode_frame(
                logits_fn, B, S, self.mask_id, steps, temperature, device, generator)
            all_ids = torch.cat([all_ids, ids_BS.unsqueeze(1)], dim=1)
            # the finished frame: its latent gives the heads, its keys/values join the cache
            if use_cache:
                h, kv = self.trunk(ids_BS.unsqueeze(1), cond_w[:, -1:], t0=n - start, kv_cache=cache, return_kv=True,
                                   prev_ids_BS=prev)
                cache = append_kv(cache, kv)
                cache_len += 1
            else:
                h, _ = self.trunk(all_ids[:, start : n + 1], cond_w)
                h = h[:, -1:]
            hd = self.heads(h)
            outs["ids"].append(ids_BS)
            outs["prob"].append(prob_BS)
            if return_probs:
                outs["probs"].append(probs_BSV)
            outs["reward"].append(hd["reward"][:, 0])
            outs["success"].append(hd["success_logit"][:, 0].sigmoid())
            if "state" in hd:
                outs["state"].append(hd["state"][:, 0])
        result = {
            "ids_BThw": rearrange(torch.stack(outs["ids"], 1), "b t (h w) -> b t h w", h=hh),
            "token_prob_BThw": rearrange(torch.stack(outs["prob"], 1), "b t (h w) -> b t h w", h=hh),
            "reward_BT": torch.stack(outs["reward"], 1),
            "success_BT": torch.stack(outs["success"], 1),
        }
        if outs["state"]:
            result["state_BTS"] = torch.stack(outs["state"], 1)
        if return_probs:
            result["probs_BThwV"] = rearrange(torch.stack(outs["probs"], 1), "b t (h w) v -> b t h w v", h=hh)
        return result
