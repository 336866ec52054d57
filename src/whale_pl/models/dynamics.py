"""Stage 3: the action- and behavior-conditioned ST-MaskGIT dynamics model over token grids
(docs/method.md, "Stage 3"; its interface: docs/contracts.md, "Stage 3").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from whale_pl.models.maskgit import corrupt_tokens, maskgit_decode_frame, training_mask
from whale_pl.models.st_block import KV, STTransformer, append_kv

ZFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids_BThw, actions_BTA) -> z_BTZ
ActFn = Callable[[int, dict[str, torch.Tensor]], torch.Tensor]  # (frame t, imagined so far) -> actions_BA
COPY_INIT = 4.0  # initial bias of the copy gate: a fresh model puts the previous id's logit 4 nats up


@dataclass
class DynamicsNet:
    """The dynamics model's architecture (``DynamicsModule``'s ``net:`` group)."""

    dim: int = 256
    depth: int = 8
    heads: int = 8
    max_frames: int = 16  # frames one pass attends over (context + generated)
    max_stride: int = 4  # clip strides embedded (1, and 2.. for retracing), in units of frame_stride
    change_weight: float = 1.0  # CE weight w of targets that change; log w on the previous id's logit undoes it
    transition_rank: int = 0  # r > 0: per-(position, previous id) rank-r maps on the code-space query


class DynamicsModel(nn.Module):
    """ST-MaskGIT world model: ``forward(ids_BThw, actions_BTA, z_BTZ) -> logits_BThwV``."""

    def __init__(self, codebook_size: int, grid_hw: tuple[int, int] | list[int], action_dim: int, behavior_dim: int = 0,
                 state_dim: int = 0, dim: int = 256, depth: int = 8, heads: int = 8, max_frames: int = 16,
                 max_stride: int = 4, code_dim: int = 0, change_weight: float = 1.0, transition_rank: int = 0) -> None:
        super().__init__()
        if not change_weight > 0:
            raise ValueError(f"change_weight must be > 0, got {change_weight}")
        if isinstance(transition_rank, bool) or not isinstance(transition_rank, int) or transition_rank < 0:
            raise ValueError(f"transition_rank must be an int >= 0, got {transition_rank!r}")
        if transition_rank > 0 and code_dim <= 0:
            raise ValueError("transition_rank > 0 needs code_dim > 0 (code vectors): it adds to the code-space query")
        self.codebook_size = self.mask_id = codebook_size
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.num_tokens = self.grid_hw[0] * self.grid_hw[1]
        self.action_dim, self.behavior_dim, self.state_dim = action_dim, behavior_dim, state_dim
        self.max_frames, self.max_stride, self.dim = max_frames, max_stride, dim
        self.change_weight, self.code_dim, self.transition_rank = float(change_weight), code_dim, transition_rank
        self._build_inputs()
        self.transformer = STTransformer(dim, depth, heads, causal=True, cond_dim=dim)
        self._build_outputs()

    def _build_inputs(self) -> None:
        """Token, previous-id, position and conditioning embeddings."""
        V, D = self.codebook_size, self.dim
        self.tok_emb = nn.Embedding(V + 1, D)
        self.prev_emb = nn.Embedding(V + 2, D)  # id V + 1: no earlier frame in the window
        nn.init.normal_(self.prev_emb.weight, std=0.02)
        self.pos_s = nn.Parameter(torch.randn(self.num_tokens, D) * 0.02)
        self.pos_t = nn.Parameter(torch.randn(self.max_frames, D) * 0.02)
        self.act_mlp = nn.Sequential(nn.Linear(self.action_dim, D), nn.GELU(), nn.Linear(D, D))
        self.beh_proj = nn.Linear(self.behavior_dim, D) if self.behavior_dim > 0 else None
        self.stride_emb = nn.Embedding(self.max_stride + 1, D)
        self.start = nn.Parameter(torch.zeros(D))
        self.cond_norm = nn.LayerNorm(D)

    def _build_outputs(self) -> None:
        """Token logits (with the code-vector, transition and copy paths) and the frame heads."""
        V, D, C, r = self.codebook_size, self.dim, self.code_dim, self.transition_rank
        self.logits_head = nn.Linear(D, V)
        self.code_in = self.code_out = None
        if C > 0:  # the codebook is the frozen tokenizer's, installed by set_code_vectors (not a parameter)
            self.register_buffer("code_vectors", torch.zeros(V, C), persistent=False)
            self.code_in = nn.Linear(C, D, bias=False)
            self.code_out = nn.Linear(D, C, bias=False)
            self.code_scale = nn.Parameter(torch.tensor(1.0))
        self.trans = self.trans_in = None
        if r > 0:
            self.trans = nn.Embedding(self.num_tokens * V, C * r)
            nn.init.zeros_(self.trans.weight)  # starts as the plain model
            self.trans_in = nn.Linear(D, r)
        self.copy_gate = nn.Linear(D, 1)
        nn.init.zeros_(self.copy_gate.weight)
        nn.init.constant_(self.copy_gate.bias, COPY_INIT)
        self.frame_head = nn.Sequential(nn.Linear(D, D), nn.GELU())
        self.reward_head = nn.Linear(D, 1)
        self.success_head = nn.Linear(D, 1)
        self.state_head = nn.Linear(D, self.state_dim) if self.state_dim > 0 else None

    def set_code_vectors(self, code_vectors_VE: torch.Tensor) -> None:
        """Install the tokenizer's codebook ``[V, C]`` (unit code vectors) for ``code_dim > 0``."""
        self.code_vectors.copy_(code_vectors_VE.detach().to(self.code_vectors))

    @property
    def uses_behavior(self) -> bool:
        """Whether the model is conditioned on the behavior embedding z (False: the ablation)."""
        return self.beh_proj is not None

    def prev_ids(self, ids_BTS: torch.Tensor, prev_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Ids ``[B, T, S]`` held one frame earlier: ``prev_ids_BS`` before the first (None: ``codebook_size + 1``)."""
        first = torch.full_like(ids_BTS[:, 0], self.codebook_size + 1) if prev_ids_BS is None else prev_ids_BS
        return torch.cat([first.unsqueeze(1), ids_BTS[:, :-1]], dim=1)

    def condition(self, act_in_BTA: torch.Tensor, z_in_BTZ: torch.Tensor | None,
                  stride_B: torch.Tensor | None) -> torch.Tensor:
        """Per-slot conditioning ``[B, T, D]`` from the action/z leading into each slot and the stride (None: 1)."""
        B = act_in_BTA.shape[0]
        c = self.act_mlp(act_in_BTA)
        if self.beh_proj is not None:
            c = c + self.beh_proj(z_in_BTZ)
        c = torch.cat([self.start.expand(B, 1, -1), c[:, 1:]], dim=1)
        if stride_B is None:
            stride_B = torch.ones(B, dtype=torch.long, device=act_in_BTA.device)
        if int(stride_B.max()) > self.max_stride or int(stride_B.min()) < 1:
            raise ValueError(f"frame stride must be in [1, {self.max_stride}], got {stride_B.tolist()}")
        return self.cond_norm(c + self.stride_emb(stride_B.long()).unsqueeze(1))

    @staticmethod
    def shift_in(x_BTX: torch.Tensor | None) -> torch.Tensor | None:
        """Align per-frame inputs (``x[t]`` at frame t) to slots (slot t gets ``x[t-1]``)."""
        return None if x_BTX is None else torch.cat([torch.zeros_like(x_BTX[:, :1]), x_BTX[:, :-1]], dim=1)

    def trunk(self, ids_BTS: torch.Tensor, cond_BTD: torch.Tensor, t0: int = 0, kv_cache: list[KV] | None = None,
              prev_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Hidden states ``[B, T, S, D]`` of window slots ``t0..t0+T-1`` after ``kv_cache``'s, and their keys/values."""
        T = ids_BTS.shape[1]
        if t0 + T > self.max_frames:
            raise ValueError(f"window of {t0 + T} frames exceeds max_frames={self.max_frames}")
        x = self.tok_emb(ids_BTS)
        if self.code_in is not None:  # plus the projected code vector of each known id
            known = (ids_BTS < self.codebook_size).unsqueeze(-1)
            x = x + self.code_in((self.code_vectors[ids_BTS.clamp(max=self.codebook_size - 1)] * known).to(x.dtype))
        x = x + self.pos_s + self.pos_t[t0 : t0 + T][:, None]
        x = x + self.prev_emb(self.prev_ids(ids_BTS, prev_ids_BS))
        return self.transformer(x, cond_BTD, kv_cache=kv_cache, return_kv=True)

    def token_logits(self, h_BTSD: torch.Tensor, prev_ids_BTS: torch.Tensor | None = None,
                     raw: bool = False) -> torch.Tensor:
        """Token logits ``[B, T, S, V]``: copy gate and (unless ``raw``) log ``change_weight`` at the previous id."""
        logits = self.logits_head(h_BTSD)
        if self.code_out is not None:
            q = self.code_out(h_BTSD)
            if self.trans is not None and prev_ids_BTS is not None:
                q = q + self.transition_query(h_BTSD, prev_ids_BTS).to(q.dtype)
            logits = logits + self.code_scale * (q @ self.code_vectors.to(q.dtype).T)
        if prev_ids_BTS is None:
            return logits
        bias = 0.0 if raw else math.log(self.change_weight)  # undoes the weighting's shift of the odds
        return self.add_at_prev(logits, prev_ids_BTS, self.copy_gate(h_BTSD).to(logits.dtype) + bias)

    def transition_query(self, h_BTSD: torch.Tensor, prev_ids_BTS: torch.Tensor) -> torch.Tensor:
        """The transition table's code-space query ``[B, T, S, code_dim]`` (zero where the previous id is >= V)."""
        V, S = self.codebook_size, h_BTSD.shape[2]
        idx_BTS = torch.arange(S, device=h_BTSD.device) * V + prev_ids_BTS.clamp(max=V - 1)
        table_BTSER = rearrange(self.trans(idx_BTS), "b t s (c r) -> b t s c r", r=self.transition_rank)
        proj_BTSR = self.trans_in(h_BTSD).to(table_BTSER.dtype)
        q_BTSE = torch.einsum("btscr,btsr->btsc", table_BTSER, proj_BTSR)
        return q_BTSE * (prev_ids_BTS < V).unsqueeze(-1).to(q_BTSE.dtype)

    def add_at_prev(self, logits_NV: torch.Tensor, prev_ids_N: torch.Tensor,
                    bonus: torch.Tensor | float) -> torch.Tensor:
        """``logits [..., V]`` plus ``bonus`` (a float, or ``[..., 1]``) at each known (< V) previous id."""
        if isinstance(bonus, float) and bonus == 0.0:
            return logits_NV
        V = self.codebook_size
        known = (prev_ids_N < V).unsqueeze(-1).to(logits_NV.dtype)
        return logits_NV.scatter_add(-1, prev_ids_N.clamp(max=V - 1).unsqueeze(-1), bonus * known)

    def heads(self, h_BTSD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reward, success logit and state predicted from each frame's mean latent."""
        f = self.frame_head(h_BTSD.mean(dim=2))
        out = {"reward": self.reward_head(f).squeeze(-1), "success_logit": self.success_head(f).squeeze(-1)}
        if self.state_head is not None:
            out["state"] = self.state_head(f)
        return out

    def forward(self, ids_BThw: torch.Tensor, actions_BTA: torch.Tensor, z_BTZ: torch.Tensor | None = None,
                stride_B: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``[B, T, h, w, V]`` of every position of ``ids_BThw`` (may hold ``mask_id``) and the heads."""
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        h, _ = self.trunk(ids, self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B))
        logits = rearrange(self.token_logits(h, self.prev_ids(ids)), "b t (h w) v -> b t h w v", h=ids_BThw.shape[2])
        return logits, self.heads(h)

    def training_losses(self, ids_BThw: torch.Tensor, actions_BTA: torch.Tensor, z_BTZ: torch.Tensor | None,
                        rewards_BT: torch.Tensor, success_BT: torch.Tensor, state_BTP: torch.Tensor | None = None,
                        stride_B: torch.Tensor | None = None, context_frames: int = 1, corrupt_prob: float = 0.0,
                        generator: torch.Generator | None = None,
                        max_context_frames: int | None = None) -> dict[str, torch.Tensor]:
        """MaskGIT ``ce`` after the context, the head losses and ``acc`` (docs/method.md, "Training")."""
        B, T, hh, ww = ids_BThw.shape
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        ctx: int | torch.Tensor = context_frames
        if max_context_frames is not None and max_context_frames > context_frames:
            hi = min(max_context_frames, T - 1)
            ctx = torch.randint(context_frames, hi + 1, (B,), generator=generator).to(ids.device)
        mask = training_mask(B, T, hh * ww, ctx, ids.device, generator)
        whole, hit = corrupt_tokens(ids, mask, ctx, corrupt_prob, self.codebook_size, generator)  # the copy source
        cond = self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B)
        h, _ = self.trunk(whole.masked_fill(mask, self.mask_id), cond)
        logits = self.token_logits(h, self.prev_ids(whole), raw=True)  # the copy path reads the unmasked input
        target = mask | hit
        out = {"ce": self._weighted_ce(logits[target], ids[target], self.prev_ids(ids)[target])}
        pred = self.add_at_prev(logits[mask], self.prev_ids(whole)[mask], math.log(self.change_weight)).argmax(-1)
        out["acc"] = (pred == ids[mask]).float().mean()
        heads = self.heads(h)  # reward and success of the transition into each frame after the first
        out["reward"] = F.mse_loss(heads["reward"][:, 1:].float(), rewards_BT[:, :-1].float())
        out["success"] = F.binary_cross_entropy_with_logits(heads["success_logit"][:, 1:].float(),
                                                            success_BT[:, :-1].float())
        if self.state_head is not None and state_BTP is not None and state_BTP.shape[-1] > 0:
            if state_BTP.shape[-1] != self.state_dim:
                raise ValueError(f"batch state has {state_BTP.shape[-1]} dims, the model has {self.state_dim}")
            out["state"] = F.mse_loss(heads["state"].float(), state_BTP.float())
        return out

    def _weighted_ce(self, logits_NV: torch.Tensor, target_N: torch.Tensor, prev_N: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; with ``change_weight`` w, targets that differ from the previous frame's id count w times."""
        if self.change_weight == 1.0:
            return F.cross_entropy(logits_NV.float(), target_N)
        w = torch.where(target_N != prev_N, self.change_weight, 1.0)
        return (F.cross_entropy(logits_NV.float(), target_N, reduction="none") * w).sum() / w.sum()

    @torch.no_grad()
    def teacher_forced(self, ids_BThw: torch.Tensor, actions_BTA: torch.Tensor, z_BTZ: torch.Tensor | None = None,
                       stride_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T-1, h, w, V]`` of frames 1.., each in one step from a masked frame after the true ones."""
        ids = rearrange(ids_BThw, "b t h w -> b t (h w)")
        cond = self.condition(self.shift_in(actions_BTA), self.shift_in(z_BTZ), stride_B)
        _, kv = self.trunk(ids, cond)
        query = torch.full_like(ids[:, :1], self.mask_id)
        outs = []
        for t in range(1, ids.shape[1]):
            past = [(k[:, :, :t], v[:, :, :t]) for k, v in kv]
            h, _ = self.trunk(query, cond[:, t : t + 1], t0=t, kv_cache=past, prev_ids_BS=ids[:, t - 1])
            outs.append(self.token_logits(h, ids[:, t - 1 : t]))
        return rearrange(torch.cat(outs, dim=1), "b t (h w) v -> b t h w v", h=ids_BThw.shape[2])

    @torch.no_grad()
    def predict_next(self, context_ids_BThw: torch.Tensor, actions_BTA: torch.Tensor, z_BTZ: torch.Tensor | None = None,
                     stride_B: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``probs_BhwV`` of the frame after the context, in one step from a masked one (retracing; stride_B k: after a
        context strided by k, ``actions[:, -1]`` composed over k steps)."""
        C, hh = context_ids_BThw.shape[1], context_ids_BThw.shape[2]
        ids = rearrange(context_ids_BThw, "b t h w -> b t (h w)")
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.mask_id)], dim=1)
        act_in = torch.cat([torch.zeros_like(actions_BTA[:, :1]), actions_BTA], dim=1)
        z_in = None if z_BTZ is None else torch.cat([torch.zeros_like(z_BTZ[:, :1]), z_BTZ], dim=1)
        t0 = max(0, C + 1 - self.max_frames)  # keep the last max_frames slots; the window restarts at its first
        ids, act_in, z_in = ids[:, t0:], act_in[:, t0:], None if z_in is None else z_in[:, t0:]
        h, _ = self.trunk(ids, self.condition(act_in, z_in, stride_B))
        probs_BSV = self.token_logits(h[:, -1:], ids[:, -2:-1])[:, 0].float().softmax(-1)
        return {"probs_BhwV": rearrange(probs_BSV, "b (h w) v -> b h w v", h=hh)}

    @torch.no_grad()
    def imagine(self, context_ids_BThw: torch.Tensor, actions_BTA: torch.Tensor | None,
                z: torch.Tensor | ZFn | None = None, horizon: int | None = None, steps: int = 4,
                temperature: float = 1.0, stride_B: torch.Tensor | None = None, use_cache: bool = True,
                generator: torch.Generator | None = None,
                act_fn: ActFn | None = None, shared_context: bool = False) -> dict[str, torch.Tensor]:
        """Roll out frame by frame from the context, open or closed loop (docs/contracts.md, "Stage 3").
        ``shared_context``: every row has the same history (one plan's candidates): its keys/values computed once."""
        B, C, hh, ww = context_ids_BThw.shape
        if actions_BTA is None:
            actions_BTA = torch.zeros(B, 0, self.action_dim, device=context_ids_BThw.device)
        horizon = self._check_rollout(C, actions_BTA, horizon, act_fn)
        roll = Rollout(context_ids_BThw, actions_BTA, z, act_fn)
        start, cache = 0, None  # the window's first frame; temporal keys/values of its finished frames
        for n in range(C, C + horizon):
            if n - start + 1 > self.max_frames:  # window full: restart it from its recent frames
                start, cache = n + 1 - max(1, self.max_frames // 2), None
            cond_BTD = self._window_condition(roll, range(start, n + 1), stride_B)
            past_BTS = roll.ids_BTS[:, start:n]
            if use_cache and cache is None:  # (re)prime the cache with the window's finished frames
                cache = self._prime(past_BTS, cond_BTD[:, :-1], shared_context and start == 0)
            prev_B1S = past_BTS[:, -1:] if past_BTS.shape[1] else None

            def logits_fn(ids_BS: torch.Tensor) -> torch.Tensor:
                """Logits of the frame being decoded, given its ids so far."""
                return self.token_logits(self._frame_after(past_BTS, ids_BS, cond_BTD, cache)[0], prev_B1S)[:, 0]

            ids_BS, prob_BS = maskgit_decode_frame(logits_fn, B, hh * ww, self.mask_id, steps, temperature,
                                                   context_ids_BThw.device, generator)
            h_B1SD, kv = self._frame_after(past_BTS, ids_BS, cond_BTD, cache)
            cache = None if cache is None else append_kv(cache, kv)
            roll.add_frame(ids_BS, prob_BS, self.heads(h_B1SD))
        return roll.outputs()

    def _prime(self, past_BTS: torch.Tensor, cond_BTD: torch.Tensor, shared: bool) -> list[KV]:
        """Keys/values of a window's finished frames; with ``shared`` (identical rows) computed on row 0 only."""
        if not shared:
            return self.trunk(past_BTS, cond_BTD)[1]
        B = past_BTS.shape[0]
        return [(k.repeat(B, 1, 1, 1), v.repeat(B, 1, 1, 1)) for k, v in self.trunk(past_BTS[:1], cond_BTD[:1])[1]]

    def _check_rollout(self, C: int, actions_BTA: torch.Tensor, horizon: int | None, act_fn: ActFn | None) -> int:
        """The rollout's horizon, after checking its inputs against the model."""
        if horizon is None:
            if act_fn is not None:
                raise ValueError("with act_fn, pass the horizon (the actions are chosen as the rollout goes)")
            horizon = actions_BTA.shape[1] - C + 1
        if horizon < 1 or (act_fn is None and actions_BTA.shape[1] < C + horizon - 1):
            raise ValueError(f"need >= C + horizon - 1 = {C + horizon - 1} actions, got {actions_BTA.shape[1]}")
        if C > self.max_frames - 1:
            raise ValueError(f"context of {C} frames leaves no room in max_frames={self.max_frames}")
        return horizon

    def _window_condition(self, roll: Rollout, frames: range, stride_B: torch.Tensor | None) -> torch.Tensor:
        """Conditioning ``[B, T, D]`` of a window of a rollout's frames; its first slot takes the start vector."""
        B, dev = roll.ids_BTS.shape[0], roll.ids_BTS.device
        no_action = torch.zeros(B, self.action_dim, dtype=roll.actions_BTA.dtype, device=dev)
        acts = torch.stack([roll.action_at(n - 1) if n > 0 else no_action for n in frames], 1)
        zs = None
        if self.uses_behavior:
            no_z = torch.zeros(B, self.behavior_dim, device=dev)
            zs = torch.stack([roll.z_at(n - 1) if n > 0 else no_z for n in frames], 1)
        return self.condition(acts, zs, stride_B)

    def _frame_after(self, past_BTS: torch.Tensor, ids_BS: torch.Tensor, cond_BTD: torch.Tensor,
                     cache: list[KV] | None) -> tuple[torch.Tensor, list[KV] | None]:
        """Hidden state ``[B, 1, S, D]`` and keys/values of ``ids_BS`` after ``past_BTS`` (its ``cache``, or a pass)."""
        t = past_BTS.shape[1]
        if cache is None:
            h, _ = self.trunk(torch.cat([past_BTS, ids_BS.unsqueeze(1)], dim=1), cond_BTD)
            return h[:, -1:], None
        return self.trunk(ids_BS.unsqueeze(1), cond_BTD[:, -1:], t0=t, kv_cache=cache,
                          prev_ids_BS=past_BTS[:, -1] if t > 0 else None)


class Rollout:
    """The growing history of one ``imagine`` call: frames, actions and z so far, and the imagined outputs."""

    def __init__(self, context_ids_BThw: torch.Tensor, actions_BTA: torch.Tensor, z: torch.Tensor | ZFn | None,
                 act_fn: ActFn | None) -> None:
        self.hh = context_ids_BThw.shape[2]
        self.ids_BTS = rearrange(context_ids_BThw, "b t h w -> b t (h w)")
        self.actions_BTA = actions_BTA  # given, then extended by act_fn's choices
        self.act_fn, self.z = act_fn, z
        self.z_rows: list[torch.Tensor] = []  # z of each frame so far, when z is the prior
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)  # imagine's outputs, frame by frame

    def action_at(self, n: int) -> torch.Tensor:
        """The action ``[B, A]`` taken at frame n: given, or chosen now by ``act_fn`` from what is imagined so far."""
        while self.actions_BTA.shape[1] <= n:  # _check_rollout made sure act_fn is set when the given ones end
            a_BA = self.act_fn(self.actions_BTA.shape[1], self.outputs())
            self.actions_BTA = torch.cat([self.actions_BTA, a_BA.unsqueeze(1)], dim=1)
        return self.actions_BTA[:, n]

    def z_at(self, n: int) -> torch.Tensor:
        """The behavior embedding ``[B, Z]`` of frame n (leading into frame n+1), from history ``<= n``."""
        if torch.is_tensor(self.z):
            return self.z[:, n]
        while len(self.z_rows) <= n:
            m = len(self.z_rows)
            self.action_at(m)
            ids_hist = rearrange(self.ids_BTS[:, : m + 1], "b t (h w) -> b t h w", h=self.hh)
            self.z_rows.append(self.z(ids_hist, self.actions_BTA[:, : m + 1])[:, -1])
        return self.z_rows[n]

    def add_frame(self, ids_BS: torch.Tensor, prob_BS: torch.Tensor, heads: dict[str, torch.Tensor]) -> None:
        """Append an imagined frame: its ids, each chosen id's probability (and distribution, if kept), the heads."""
        self.ids_BTS = torch.cat([self.ids_BTS, ids_BS.unsqueeze(1)], dim=1)
        new = {"ids_BThw": ids_BS, "token_prob_BThw": prob_BS, "reward_BT": heads["reward"][:, 0],
               "success_BT": heads["success_logit"][:, 0].sigmoid(),
               "state_BTP": heads["state"][:, 0] if "state" in heads else None}
        for k, v in new.items():
            if v is not None:
                self.rows[k].append(v)

    def outputs(self) -> dict[str, torch.Tensor]:
        """The imagined frames so far, as ``DynamicsModel.imagine`` returns them (empty before the first)."""
        out = {k: torch.stack(v, 1) for k, v in self.rows.items()}
        return {k: rearrange(v, "b t (h w) ... -> b t h w ...", h=self.hh) if "hw" in k else v for k, v in out.items()}
