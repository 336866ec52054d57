"""Stage 1: the ST-ViViT VQ-VAE video tokenizer (Genie-style), causal in time, any clip length
(docs/method.md, "Stage 1").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from whale_pl.models.quantizer import VectorQuantizer, distributed
from whale_pl.models.st_block import STTransformer


@dataclass
class TokenizerOutput:
    """What a training forward pass gives: reconstruction, token ids, commitment loss, restarted codes."""

    recon_BTCHW: torch.Tensor
    ids_BThw: torch.Tensor
    commit_loss: torch.Tensor
    restarted: int


@dataclass
class TokenizerNet:
    """The tokenizer's architecture (``TokenizerModule``'s ``net:`` group)."""

    frame_size: tuple[int, int] = (64, 64)
    patch_size: int = 8
    dim: int = 256
    enc_depth: int = 4
    dec_depth: int = 4
    heads: int = 4
    codebook_size: int = 1024
    code_dim: int = 32
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99  # of the EMA codebook
    restart_threshold: float = 0.03  # dead codes (usage below this share of uniform) restart from encoder outputs


class VideoTokenizer(nn.Module):
    """Patchify -> causal ST encoder -> VQ -> causal ST decoder -> pixels."""

    def __init__(self, frame_size: tuple[int, int] | list[int] = (64, 64), patch_size: int = 8, dim: int = 256,
                 enc_depth: int = 4, dec_depth: int = 4, heads: int = 4,
                 codebook_size: int = 1024, code_dim: int = 32, beta: float = 0.25, ema_decay: float = 0.99,
                 restart_threshold: float = 0.03) -> None:
        super().__init__()
        H, W = (int(s) for s in frame_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f"frame_size {H}x{W} is not divisible by patch_size={patch_size}; "
                             "choose a patch size that divides both sides")
        self.frame_size, self.patch_size = (H, W), patch_size
        self.codebook_size, self.code_dim = codebook_size, code_dim
        h, w = H // patch_size, W // patch_size
        patch_dim = 3 * patch_size * patch_size  # RGB
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.enc_pos = nn.Parameter(torch.randn(h * w, dim) * 0.02)
        self.encoder = STTransformer(dim, enc_depth, heads, causal=True)
        self.to_code = nn.Linear(dim, code_dim)
        self.quantizer = VectorQuantizer(codebook_size, code_dim, beta=beta, decay=ema_decay,
                                         restart_threshold=restart_threshold)
        self.from_code = nn.Linear(code_dim, dim)
        self.dec_pos = nn.Parameter(torch.randn(h * w, dim) * 0.02)
        self.decoder = STTransformer(dim, dec_depth, heads, causal=True)
        self.to_pixels = nn.Linear(dim, patch_dim)
        # per-position pixel bias, set to the first training batch's mean patch: the decoder learns residuals
        self.pixel_bias = nn.Parameter(torch.zeros(h * w, patch_dim))
        self.register_buffer("pixel_bias_initialized", torch.tensor(False))

    def grid_hw(self, frame_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid (h, w) for frames of size ``frame_hw`` (default: the configured size)."""
        H, W = frame_hw if frame_hw is not None else self.frame_size
        return H // self.patch_size, W // self.patch_size

    def _encode_latent(self, frames_BTCHW: torch.Tensor) -> torch.Tensor:
        """Frames [B, T, C, H, W] of the configured size -> unquantised latents [B, T, S, code_dim]."""
        if frames_BTCHW.ndim != 5:
            raise ValueError(f"frames must be [B, T, C, H, W], got shape {tuple(frames_BTCHW.shape)}")
        _, _, C, H, W = frames_BTCHW.shape
        if (C, H, W) != (3, *self.frame_size):
            raise ValueError(f"frames are {C}x{H}x{W} (CxHxW) but the tokenizer was built for "
                             f"3x{self.frame_size[0]}x{self.frame_size[1]}")
        return self.to_code(self.encoder(self.patch_embed(self._patches(frames_BTCHW)) + self.enc_pos))

    def _patches(self, frames_BTCHW: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] frames -> [B, T, S, patch_dim] patches."""
        p = self.patch_size
        return rearrange(frames_BTCHW, "b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)", p1=p, p2=p)

    def _decode_codes(self, codes_BTSE: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, T, S, code_dim] -> frames [B, T, C, H, W] (unclamped)."""
        h, p = self.grid_hw()[0], self.patch_size
        x = self.to_pixels(self.decoder(self.from_code(codes_BTSE) + self.dec_pos)) + self.pixel_bias
        return rearrange(x, "b t (h w) (p1 p2 c) -> b t c (h p1) (w p2)", h=h, p1=p, p2=p)

    def forward(self, frames_BTCHW: torch.Tensor) -> TokenizerOutput:
        """Reconstruct frames through the quantiser (training path; straight-through gradient)."""
        z_BTSE = self._encode_latent(frames_BTCHW)
        if self.training and not bool(self.pixel_bias_initialized):
            with torch.no_grad():
                mean = self._patches(frames_BTCHW.float()).mean(dim=(0, 1))
                if distributed():
                    dist.all_reduce(mean)  # every rank must start from the same bias
                    mean /= dist.get_world_size()
                self.pixel_bias.copy_(mean)
                self.pixel_bias_initialized.fill_(True)
        B, T = z_BTSE.shape[:2]
        q = self.quantizer(rearrange(z_BTSE, "b t s c -> (b t s) c"))
        codes_BTSE = rearrange(q.codes_NC, "(b t s) c -> b t s c", b=B, t=T)
        ids_BThw = rearrange(q.ids_N, "(b t h w) -> b t h w", b=B, t=T, h=self.grid_hw()[0])
        return TokenizerOutput(self._decode_codes(codes_BTSE.to(z_BTSE.dtype)), ids_BThw, q.commit_loss, q.restarted)

    @torch.no_grad()
    def encode(self, frames_BTCHW: torch.Tensor) -> torch.Tensor:
        """frames in [-1, 1], [B,T,C,H,W] -> token ids [B,T,h,w], in float32 under any autocast (bf16 flipped ~1%)."""
        with torch.autocast(frames_BTCHW.device.type, enabled=False):
            z_BTSE = self._encode_latent(frames_BTCHW.float())
        return rearrange(self.quantizer.lookup(z_BTSE), "b t (h w) -> b t h w", h=self.grid_hw()[0])

    def embed(self, ids_BThw: torch.Tensor) -> torch.Tensor:
        """token ids [B,T,h,w] -> unit code vectors [B,T,h,w,code_dim]."""
        return self.quantizer.embed(ids_BThw)

    @torch.no_grad()
    def decode(self, ids_BThw: torch.Tensor) -> torch.Tensor:
        """token ids [B,T,h,w] -> frames [B,T,C,H,W], clamped to [-1, 1]."""
        codes_BTSE = rearrange(self.embed(ids_BThw), "b t h w c -> b t (h w) c")
        return self._decode_codes(codes_BTSE).clamp(-1, 1)
