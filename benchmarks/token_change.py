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

    .venv/bin/python benchmarks/token_change.py                  # stride 1 (the demo dynamics)
    .venv/bin/python benchmarks/token_change.py --stride 1 2 3   # coarser time steps too

Last line: ``token_change_p_max: <largest conditional change probability at the first stride> prob``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from whale_pl.data.datamodule import MetaWorldDataModule
from whale_pl.lit.behavior_module import frames_to_unit
from whale_pl.lit.handoff import load_frozen
from whale_pl.lit.tokenizer_module import TokenizerModule


@torch.no_grad()
def clip_ids(tok, episodes, clip_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[N, clip_len, h*w]`` of consecutive clips and the xyz action norm ``[N, clip_len]`` of
    the (composed) action taken at each of their frames."""
    ids, norms = [], []
    for ep in episodes:
        frames = frames_to_unit(torch.from_numpy(ep.frames[::stride]).permute(0, 3, 1, 2))
        n = (len(frames) // clip_len) * clip_len
        for s in range(0, n, clip_len):
            ids.append(tok.encode(frames[s : s + clip_len][None])[0].flatten(1))
        acts = torch.from_numpy(ep.actions[: n * stride, :3]).reshape(n, stride, 3).sum(1)
        norms.append(acts.norm(dim=-1).reshape(-1, clip_len))
    return torch.stack(ids), torch.cat(norms)


def change_stats(ids_NTS: torch.Tensor, norm_NT: torch.Tensor, grid_hw: tuple[int, int]) -> dict[str, float]:
    changed = ids_NTS[:, 1:] != ids_NTS[:, :-1]  # [N, T-1, S]: change into frame t+1
    now, nxt = changed[:, :-1], changed[:, 1:]
    h, w = grid_hw
    nb = F.conv2d(now.float().reshape(-1, 1, h, w), torch.ones(1, 1, 3, 3), padding=1).reshape(now.shape)
    big = norm_NT[:, 1:-1, None] >= torch.quantile(norm_NT[:, 1:-1].flatten(), 0.8)
    out = {"p_change": changed.float().mean().item(),
           "p_change_after_change": nxt[now].float().mean().item(),
           "p_change_after_still": nxt[~now].float().mean().item()}
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
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok = load_frozen(a.tokenizer, TokenizerModule).model
    dm = MetaWorldDataModule(config=a.data_config)
    episodes = dm.episodes(split="train")[:: a.every]
    first = None
    for k in a.stride:
        ids, norms = clip_ids(tok, episodes, a.clip_len, k)
        st = change_stats(ids, norms, tok.grid_hw())
        first = st if first is None else first
        print(f"stride {k}: {len(episodes)} episodes, {ids.shape[0]} clips of {a.clip_len} frames")
        for name, v in st.items():
            print(f"  {name:<40} {v:.3f}")
    print(f"token_change_p_max: {first['p_max']:.3f} prob")


if __name__ == "__main__":
    main(sys.argv[1:])
