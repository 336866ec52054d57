"""Which conditioning injection (adanorm / additive / token) should the dynamics use? Equal short
training of each variant on the same Meta-World token clips, then teacher-forced next-frame token
accuracy on held-out clips (val + OOD policies) beside the copy-the-previous-frame baseline.

Tokens: the frozen stage-1 tokenizer when ``--tokenizer-ckpt`` is given; otherwise a fixed
k-means patch quantiser (8x8 patches, ``--codebook`` centres fitted on training frames) so the
comparison can run before a tokenizer exists. Conditioning: normalised actions only (the three
variants inject z the same way, through the same per-frame vector).

    .venv/bin/python benchmarks/dynamics_injection.py [--steps 100] [--cache tokens.pt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from whale_pl.data.shards import iter_episodes, read_manifest, safe_std
from whale_pl.models.dynamics import DynamicsModel


def load_split(data: Path, splits: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ep.frames, ep.actions) for ep in iter_episodes(data, splits=splits, verify=False)]


def patches(frames_THWC: np.ndarray, p: int) -> np.ndarray:
    return rearrange(frames_THWC.astype(np.float32) / 255.0, "t (h p1) (w p2) c -> t (h w) (p1 p2 c)", p1=p, p2=p)


def kmeans_torch(x_ND: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Plain Lloyd k-means (random initial centres from the data; empty clusters re-seeded)."""
    g = torch.Generator().manual_seed(seed)
    C = x_ND[torch.randperm(len(x_ND), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x_ND, C).argmin(-1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(C).index_add_(0, assign, x_ND)
        empty = counts == 0
        C = torch.where(empty[:, None], x_ND[torch.randint(0, len(x_ND), (k,), generator=g)], sums / counts.clamp_min(1)[:, None])
    return C


def tokenise_kmeans(train, others, codebook: int, p: int, seed: int):
    rng = np.random.default_rng(seed)
    frames = [f for f, _ in train]
    pick = rng.choice(sum(len(f) for f in frames), size=min(2000, sum(len(f) for f in frames)), replace=False)
    allf = np.concatenate(frames)[np.sort(pick)]
    C = kmeans_torch(torch.from_numpy(patches(allf, p).reshape(-1, p * p * 3)), codebook, 20, seed)

    def ids(frames):
        x = torch.from_numpy(patches(frames, p))
        d = torch.cdist(x.reshape(-1, x.shape[-1]), C)
        g = frames.shape[1] // p
        return d.argmin(-1).view(len(frames), g, g)

    return [[ids(f) for f, _ in split] for split in (train, *others)]


def tokenise_ckpt(path: str, splits, chunk: int):
    from whale_pl.lit.handoff import load_frozen
    from whale_pl.lit.tokenizer_module import TokenizerModule

    tok = load_frozen(path, TokenizerModule).model
    out = []
    for split in splits:
        rows = []
        for f, _ in split:
            # encode in clip-length chunks, as the datamodule's clips are (causal tokenizer)
            x = torch.from_numpy(f).permute(0, 3, 1, 2).float() / 127.5 - 1
            rows.append(torch.cat([tok.encode(x[s : s + chunk].unsqueeze(0))[0] for s in range(0, len(x), chunk)]))
        out.append(rows)
    return out, tok.codebook_size


def clips(ids_list, acts_list, T: int, every: int):
    xs, acs = [], []
    for ids, a in zip(ids_list, acts_list):
        for s in range(0, len(ids) - T + 1, every):
            xs.append(ids[s : s + T])
            acs.append(torch.from_numpy(a[s : s + T]))
    return torch.stack(xs), torch.stack(acs).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data_shards/metaworld/demo"))
    p.add_argument("--tokenizer-ckpt", default=None)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--variants", default="adanorm,additive,token")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--cache", type=Path, default=None, help="token ids cache (.pt); reused when present")
    p.add_argument("--prev-frame-input", action="store_true", help="give the model the previous frame's ids")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest on a busy box)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    man = read_manifest(a.data)
    mean = np.asarray(man["action_stats"]["mean"], np.float32)
    std = safe_std(man["action_stats"]["std"]).astype(np.float32)
    g_idx = man["action_space"].get("gripper_index")
    if g_idx is not None:
        mean[g_idx], std[g_idx] = 0.0, 1.0
    splits = [load_split(a.data, ["train"]), load_split(a.data, ["val"]), load_split(a.data, ["ood"])]
    print(f"read {sum(len(s) for s in splits)} episodes", flush=True)
    t0 = time.time()
    if a.cache is not None and a.cache.exists():
        ids, V, tok_name = torch.load(a.cache)
    elif a.tokenizer_ckpt:
        ids, V = tokenise_ckpt(a.tokenizer_ckpt, splits, a.clip_len)
        tok_name = f"tokenizer {a.tokenizer_ckpt}"
    else:
        ids, V = tokenise_kmeans(splits[0], splits[1:], a.codebook, 8, a.seed), a.codebook
        tok_name = f"k-means 8x8 patch quantiser, {V} codes"
    if a.cache is not None and not a.cache.exists():
        tmp = a.cache.with_suffix(".tmp")
        torch.save((ids, V, tok_name), tmp)
        tmp.rename(a.cache)
    print(f"tokenised with {tok_name} in {time.time() - t0:.0f} s", flush=True)
    norm = [[(ac - mean) / std for _, ac in s] for s in splits]
    tr_x, tr_a = clips(ids[0], norm[0], a.clip_len, a.clip_len)  # clips = encoded chunks
    ev = {name: clips(ids[i], norm[i], a.clip_len, a.clip_len) for i, name in ((1, "val"), (2, "ood"))}
    hw = tuple(tr_x.shape[2:])
    results = {}
    for variant in a.variants.split(","):
        torch.manual_seed(a.seed)
        m = DynamicsModel(V, hw, tr_a.shape[-1], dim=a.dim, depth=a.depth, heads=4, max_frames=16, injection=variant,
                          prev_frame_input=a.prev_frame_input)
        opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(a.seed)
        t0 = time.time()
        for step in tqdm(range(a.steps), desc=variant, mininterval=10):
            idx = torch.randint(0, len(tr_x), (a.batch,), generator=g)
            lr = a.lr * min(1.0, (step + 1) / 30)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m.training_losses(tr_x[idx], tr_a[idx], None, torch.zeros(a.batch, a.clip_len),
                                        torch.zeros(a.batch, a.clip_len), generator=g, corrupt_prob=0.1)
            opt.zero_grad()
            out["ce"].backward()
            opt.step()
        train_s = time.time() - t0
        m.eval()
        row = {"train_s": round(train_s, 1), "params": sum(q.numel() for q in m.parameters())}
        for name, (x, ac) in ev.items():
            accs, copies = [], []
            for i in range(0, len(x), 32):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = m.teacher_forced(x[i : i + 32], ac[i : i + 32])
                accs.append((logits.argmax(-1) == x[i : i + 32, 1:]).float().flatten())
                copies.append((x[i : i + 32, :-1] == x[i : i + 32, 1:]).float().flatten())
            row[f"{name}_acc"] = round(torch.cat(accs).mean().item(), 4)
            row[f"{name}_copy_acc"] = round(torch.cat(copies).mean().item(), 4)
        results[variant] = row
        print(variant, json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"tokens": tok_name, "args": {k: str(v) for k, v in vars(a).items()},
                                     "results": results}, indent=2))
    best = max(results, key=lambda k: results[k]["val_acc"])
    print(f"dynamics_injection_best_val_acc: {results[best]['val_acc']:.4f} ({best})")


if __name__ == "__main__":
    main()
