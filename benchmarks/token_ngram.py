"""Count-based next-token predictors: a model-free reference for the copy-the-previous-frame baseline.

Stage 3's quality target asks teacher-forced token accuracy to beat copying the previous frame. This
benchmark asks whether *any* lookup table does, with no learning budget in the way. It tokenizes the
demo data's train and val episodes with the stage-1 tokenizer (``--clip-len``-frame clips, as the
dynamics stage sees them), counts on the train clips which id follows at each position given a
context key, and predicts the val clips' next ids by the most frequent follower of the richest key
seen at least ``--min-count`` times (backing off to poorer keys, then to copying). Keys:

- ``id``: the position and its current id;
- ``id+action``: and the action's dominant xyz axis and sign (or "small");
- ``prev+id``: and the id it held a frame earlier;
- ``prev+id+action``: both;
- ``id+nbrs+action``: the current ids of its 4 neighbours and the action;
- ``oracle: id+next nbrs``: the *next* frame's ids of its 4 neighbours -- information no causal
  model has, the spatial context a MaskGIT step sees once the neighbours are decoded.

    .venv/bin/python benchmarks/token_ngram.py
    .venv/bin/python benchmarks/token_ngram.py --tokenizer <ckpt> --data-config <data.yaml>
    .venv/bin/python benchmarks/token_ngram.py --stride 4 --clip-len 10   # every 4th frame (20 Hz)

Last line: ``token_ngram_best_causal_minus_copy: <best causal predictor's accuracy - copy, in points> pt``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

import torch

from whale_pl.data.datamodule import MetaWorldDataModule
from whale_pl.lit.behavior_module import frames_to_unit
from whale_pl.lit.handoff import load_frozen
from whale_pl.lit.tokenizer_module import TokenizerModule

KEYS = ("id", "id+action", "prev+id", "prev+id+action", "id+nbrs+action", "oracle: id+next nbrs")
ORDERS = {  # richest key first; each backs off to the next, then to copying
    "id": ("id",),
    "id+action": ("id+action", "id"),
    "prev+id": ("prev+id", "id"),
    "prev+id+action": ("prev+id+action", "prev+id", "id"),
    "id+nbrs+action": ("id+nbrs+action", "id+action", "id"),
    "oracle: id+next nbrs": ("oracle: id+next nbrs", "id"),
}
SMALL_ACTION = 0.2  # raw action units ([-1, 1]): below this on every xyz axis the action bin is "small"


def action_bin(a_xyz: torch.Tensor) -> int:
    """0..5: the dominant xyz axis and its sign; 6: every component below ``SMALL_ACTION``."""
    if float(a_xyz.abs().max()) < SMALL_ACTION:
        return 6
    k = int(a_xyz.abs().argmax())
    return 2 * k + int(a_xyz[k] > 0)


def grid_neighbours(h: int, w: int) -> list[list[int]]:
    """Flat indices of each position's 4-neighbours on an h x w grid."""
    return [[(r + dr) * w + (c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
             if 0 <= r + dr < h and 0 <= c + dc < w] for r in range(h) for c in range(w)]


def context_keys(ids_TS: torch.Tensor, bins_T: list[int], t: int, s: int, nbrs: list[list[int]]) -> dict[str, tuple]:
    """The context keys (see the module docstring) of position ``s`` for the step from frame t to t+1."""
    cur = int(ids_TS[t, s])
    prev = int(ids_TS[t - 1, s]) if t > 0 else -1
    a = bins_T[t]
    return {
        "id": (s, cur),
        "id+action": (s, cur, a),
        "prev+id": (s, prev, cur),
        "prev+id+action": (s, prev, cur, a),
        "id+nbrs+action": (s, cur, tuple(int(ids_TS[t, j]) for j in nbrs[s]), a),
        "oracle: id+next nbrs": (s, cur, tuple(int(ids_TS[t + 1, j]) for j in nbrs[s])),
    }


def fit_counts(clips: list[tuple[torch.Tensor, list[int]]], nbrs: list[list[int]]) -> dict[str, dict]:
    """Per key kind: context key -> Counter of the next id, over every step of every clip."""
    counts: dict[str, dict] = {k: defaultdict(Counter) for k in KEYS}
    for ids_TS, bins_T in clips:
        for t in range(ids_TS.shape[0] - 1):
            for s in range(ids_TS.shape[1]):
                nxt = int(ids_TS[t + 1, s])
                for kind, key in context_keys(ids_TS, bins_T, t, s, nbrs).items():
                    counts[kind][key][nxt] += 1
    return counts


def score(counts: dict[str, dict], clips: list[tuple[torch.Tensor, list[int]]], nbrs: list[list[int]],
          order: tuple[str, ...], min_count: int) -> dict[str, float]:
    """Accuracy of the back-off predictor ``order`` on ``clips`` beside copying, and how often the
    changes it calls are right."""
    n = right = copy = called = called_right = 0
    for ids_TS, bins_T in clips:
        for t in range(ids_TS.shape[0] - 1):
            for s in range(ids_TS.shape[1]):
                cur, tgt = int(ids_TS[t, s]), int(ids_TS[t + 1, s])
                keys = context_keys(ids_TS, bins_T, t, s, nbrs)
                pred = cur
                for kind in order:
                    c = counts[kind].get(keys[kind])
                    if c is not None and sum(c.values()) >= min_count:
                        pred = c.most_common(1)[0][0]
                        break
                n += 1
                right += pred == tgt
                copy += cur == tgt
                if pred != cur:
                    called += 1
                    called_right += pred == tgt
    return {"tokens": n, "acc": right / n, "copy_acc": copy / n, "acc_minus_copy_pt": 100 * (right - copy) / n,
            "changes_called": called, "called_right": called_right / max(1, called)}


@torch.no_grad()
def tokenize(tok, episodes, clip_len: int, stride: int = 1) -> list[tuple[torch.Tensor, list[int]]]:
    """Non-overlapping ``clip_len``-frame clips of each episode's every ``stride``-th frame: (ids
    ``[T, h*w]``, bins ``[T]`` of the xyz actions composed (summed) over each stride)."""
    clips = []
    for ep in episodes:
        frames = frames_to_unit(torch.from_numpy(ep.frames[::stride]).permute(0, 3, 1, 2))
        n = len(ep.actions) // stride
        acts = torch.from_numpy(ep.actions[: n * stride, :3]).reshape(n, stride, 3).sum(1)
        for s in range(0, len(frames) - clip_len + 1, clip_len):
            ids_TS = tok.encode(frames[s : s + clip_len][None])[0].flatten(1)
            clips.append((ids_TS, [action_bin(a) for a in acts[s : s + clip_len]]))
    return clips


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/checkpoints/best.ckpt")
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--clip-len", type=int, default=12, help="the dynamics stage's clip length")
    p.add_argument("--stride", type=int, default=1, help="every stride-th frame, actions composed over it")
    p.add_argument("--min-count", type=int, nargs="+", default=[1, 3])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.stride < 1:
        p.error(f"--stride {a.stride}: expected >= 1")
    torch.set_num_threads(a.threads)
    tok = load_frozen(a.tokenizer, TokenizerModule).model
    dm = MetaWorldDataModule(config=a.data_config)
    train = tokenize(tok, dm.episodes(split="train"), a.clip_len, a.stride)
    val = tokenize(tok, dm.episodes(split="val"), a.clip_len, a.stride)
    nbrs = grid_neighbours(*tok.grid_hw())
    counts = fit_counts(train, nbrs)
    print(f"{a.tokenizer} on {a.data_config}, stride {a.stride}: counts from {len(train)} train clips, scored on {len(val)} val clips "
          f"of {a.clip_len} frames")
    best = None
    for name, order in ORDERS.items():
        for mc in a.min_count:
            r = score(counts, val, nbrs, order, mc)
            print(f"  {name:<22} min count {mc}: acc {100 * r['acc']:.3f}% vs copy {100 * r['copy_acc']:.3f}% "
                  f"({r['acc_minus_copy_pt']:+.3f} pt); {r['changes_called']} changes called, "
                  f"{100 * r['called_right']:.1f}% of them right")
            if not name.startswith("oracle") and (best is None or r["acc_minus_copy_pt"] > best):
                best = r["acc_minus_copy_pt"]
    print(f"token_ngram_best_causal_minus_copy: {best:+.3f} pt")


if __name__ == "__main__":
    main(sys.argv[1:])
