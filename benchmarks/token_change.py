"""How predictable is *when* a token changes? The ceiling on beating the copy baseline.

Teacher-forced next-frame accuracy can only rise above copying the previous frame where some
position's next id is a *different* id with probability above that of staying. This benchmark
tokenizes clips of the demo data's training episodes with the stage-1 tokenizer (as the dynamics
stage does: ``--clip-len``-frame clips, optionally every ``--stride``-th frame with composed actions'
magnitudes) and measures, per position, the empirical probability that its id changes at the next
frame given the most telling context we could find: it changed at this frame, k of its 3x3 neighbours
changed, and the action is among the largest 20 %. If even that probability stays near or below 0.5,
no model can be confident enough about *when* a token flips to beat copying by much, whatever it
knows about *what* it flips to.

It counts flicker: the share of changes undone at the very next frame (A -> B -> A), which no
model can time from the frames before. It also asks how well token changes follow *pixel* changes: the share of token changes at patches
whose pixels did not change at all (max |delta| <= 2 of 255 over the patch), and the probability that a
token changes given how much its patch's pixels changed. Changes at still patches come from the
encoder's spatial attention (a patch's code depends on the whole frame) and are noise no dynamics
model can time.

    .venv/bin/python benchmarks/token_change.py                  # stride 1 (the demo dynamics)
    .venv/bin/python benchmarks/token_change.py --stride 1 2 3   # coarser time steps too
    .venv/bin/python benchmarks/token_change.py --sticky-margin 0.02   # hysteresis at encode time

Last line: ``token_change_p_max: <largest conditional change probability at the first stride> prob``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from einops import rearrange

from whale_pl.data.datamodule import MetaWorldDataModule
from whale_pl.lit.behavior_module import frames_to_unit
from whale_pl.lit.handoff import load_frozen
from whale_pl.lit.tokenizer_module import TokenizerModule


PIXEL_BUCKETS = [(-1, 2), (2, 10), (10, 30), (30, 80), (80, 255)]  # max |delta| over a patch, in 0..255 levels


@torch.no_grad()
def clip_ids(tok, episodes, clip_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Ids ``[N, clip_len, h*w]`` of consecutive clips, the xyz action norm ``[N, clip_len]`` of
    the (composed) action taken at each of their frames, each patch's largest absolute pixel
    change from the previous frame ``[N, clip_len - 1, h*w]`` (uint8 levels), and the PSNR (dB) of
    the clips decoded from these ids."""
    ids, norms, dpix, sq_err = [], [], [], []
    p = tok.patch_size
    for ep in episodes:
        raw = torch.from_numpy(ep.frames[::stride]).permute(0, 3, 1, 2)
        frames = frames_to_unit(raw)
        n = (len(frames) // clip_len) * clip_len
        for s in range(0, n, clip_len):
            clip_ids_Thw = tok.encode(frames[s : s + clip_len][None])
            ids.append(clip_ids_Thw[0].flatten(1))
            sq_err.append(((tok.decode(clip_ids_Thw)[0] - frames[s : s + clip_len]) ** 2).mean())
            patches = rearrange(raw[s : s + clip_len].float(), "t c (h p) (w q) -> t (h w) (c p q)", p=p, q=p)
            dpix.append((patches[1:] - patches[:-1]).abs().amax(-1))
        acts = torch.from_numpy(ep.actions[: n * stride, :3]).reshape(n, stride, 3).sum(1)
        norms.append(acts.norm(dim=-1).reshape(-1, clip_len))
    psnr_db = float((10 * torch.log10(4.0 / torch.stack(sq_err))).mean())  # frames in [-1, 1]: range 2
    return torch.stack(ids), torch.cat(norms), torch.stack(dpix), psnr_db


def pixel_stats(ids_NTS: torch.Tensor, dpix_NTS: torch.Tensor) -> dict[str, float]:
    """How token changes follow pixel changes: share of changes at still patches, P(change | pixel bucket)."""
    changed = ids_NTS[:, 1:] != ids_NTS[:, :-1]
    still = dpix_NTS <= 2
    out = {"share_of_changes_at_still_patches": int((changed & still).sum()) / max(1, int(changed.sum()))}
    for lo, hi in PIXEL_BUCKETS:
        sel = (dpix_NTS > lo) & (dpix_NTS <= hi)
        if sel.any():
            out[f"p_change_pixel_delta_{max(lo, 0)}_{hi}"] = changed[sel].float().mean().item()
            out[f"share_of_patches_pixel_delta_{max(lo, 0)}_{hi}"] = sel.float().mean().item()
    return out


def change_stats(ids_NTS: torch.Tensor, norm_NT: torch.Tensor, grid_hw: tuple[int, int]) -> dict[str, float]:
    changed = ids_NTS[:, 1:] != ids_NTS[:, :-1]  # [N, T-1, S]: change into frame t+1
    now, nxt = changed[:, :-1], changed[:, 1:]
    h, w = grid_hw
    nb = F.conv2d(now.float().reshape(-1, 1, h, w), torch.ones(1, 1, 3, 3), padding=1).reshape(now.shape)
    big = norm_NT[:, 1:-1, None] >= torch.quantile(norm_NT[:, 1:-1].flatten(), 0.8)
    back = now & (ids_NTS[:, 2:] == ids_NTS[:, :-2])  # A -> B -> A: the change undone one frame later
    out = {"p_change": changed.float().mean().item(),
           "p_change_after_change": nxt[now].float().mean().item(),
           "p_change_after_still": nxt[~now].float().mean().item(),
           "share_of_changes_undone_next_frame": int(back.sum()) / max(1, int(now.sum()))}
    best = 0.0
    for k in (3, 5, 7):
        sel = now & (nb >= k) & big
        if int(sel.sum()) >= 50:
            p = nxt[sel].float().mean().item()
            out[f"p_change_after_change_nb{k}_bigaction"] = p
            out[f"share_of_changes_nb{k}_bigaction"] = int(nxt[sel].sum()) / max(1, int(nxt.sum()))
            best = max(best, p)
    out["p_max"] = best
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/checkpoints/best.ckpt")
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--clip-len", type=int, default=12, help="the dynamics stage's clip length")
    p.add_argument("--stride", type=int, nargs="+", default=[1])
    p.add_argument("--every", type=int, default=3, help="use every n-th training episode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sticky-margin", type=float, default=None,
                   help="encode with this hysteresis margin instead of the checkpoint's (VideoTokenizer.sticky_margin)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok = load_frozen(a.tokenizer, TokenizerModule).model
    if a.sticky_margin is not None:
        tok.sticky_margin = a.sticky_margin
    dm = MetaWorldDataModule(config=a.data_config)
    episodes = dm.episodes(split="train")[:: a.every]
    first = None
    for k in a.stride:
        ids, norms, dpix, psnr_db = clip_ids(tok, episodes, a.clip_len, k)
        st = {**change_stats(ids, norms, tok.grid_hw()), **pixel_stats(ids, dpix), "recon_psnr_db": psnr_db}
        first = st if first is None else first
        print(f"stride {k}: {len(episodes)} episodes, {ids.shape[0]} clips of {a.clip_len} frames")
        for name, v in st.items():
            print(f"  {name:<40} {v:.3f}")
    print(f"token_change_p_max: {first['p_max']:.3f} prob")


if __name__ == "__main__":
    main(sys.argv[1:])
