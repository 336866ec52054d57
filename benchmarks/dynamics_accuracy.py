"""Teacher-forced next-frame token accuracy of a dynamics checkpoint against the copy baseline.

On held-out clips (val and OOD episodes of the checkpoint's demo data), every frame t >= 1 is
predicted from the true frames before it, two ways: one step from a fully masked frame (the
module's ``val/acc``) and with the model's own MaskGIT decoding (``maskgit_steps``, greedy). Both
are set beside the copy-the-previous-frame baseline, and split into tokens that stay the same from
one frame to the next and tokens that change (where all of the gain over copying has to come from).
``--visible 0.25 0.5 0.75`` also scores a MaskGIT-style situation: that share of frame t's true
tokens is given (chosen at random, seed 0), and the rest are predicted in one step, beside copying
at the same positions -- does seeing most of the next frame let the model time the remaining changes?

    .venv/bin/python benchmarks/dynamics_accuracy.py [--ckpt runs/demo/dynamics/checkpoints/best.ckpt]

Last line: ``dynamics_tf_acc_minus_copy: <one-step accuracy - copy accuracy, in points> pt``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from whale_pl.data.datamodule import ClipDataModule
from whale_pl.eval_cli import load_stage_module


@torch.no_grad()
def maskgit_teacher_forced(model, ids_BThw, actions, z, steps: int) -> torch.Tensor:
    """ids [B, T-1, h, w]: frame t decoded by MaskGIT given the true frames < t."""
    outs = []
    for t in range(1, ids_BThw.shape[1]):
        zt = None if z is None else z[:, :t]
        out = model.imagine(ids_BThw[:, :t], actions[:, :t], zt, horizon=1, steps=steps, temperature=0.0)
        outs.append(out["ids_BThw"][:, 0])
    return torch.stack(outs, 1)


@torch.no_grad()
def partly_visible(model, ids_BThw, actions, z, stride, visible: float, generator: torch.Generator) -> tuple[int, int, int]:
    """Frame t (t >= 1) predicted in one step given the true frames before it and a random ``visible``
    share of its own true tokens: (hidden tokens, hidden tokens right, hidden tokens copying gets right)."""
    B, T = ids_BThw.shape[:2]
    hidden = torch.cat([torch.rand((B, 1, *ids_BThw.shape[2:]), generator=generator) >= visible
                        for _ in range(1, T)], dim=1)
    pred = model.teacher_forced(ids_BThw, actions, z, stride, given_BThw=~hidden).argmax(-1)
    tgt, prev = ids_BThw[:, 1:][hidden], ids_BThw[:, :-1][hidden]
    return tgt.numel(), int((pred[hidden] == tgt).sum()), int((prev == tgt).sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/demo/dynamics/checkpoints/best.ckpt")
    p.add_argument("--shards", default="data_shards/metaworld/demo")
    p.add_argument("--clip-len", type=int, default=12)
    p.add_argument("--batches", type=int, default=4, help="batches of 8 clips per split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--visible", type=float, nargs="*", default=[],
                   help="shares of frame t's true tokens given before its other tokens are predicted")
    a = p.parse_args(argv)
    if any(not 0.0 <= v < 1.0 for v in a.visible):
        p.error(f"--visible {a.visible}: each share must be in [0, 1)")
    gen = torch.Generator().manual_seed(0)
    vis = {v: [0, 0, 0] for v in a.visible}
    torch.set_num_threads(a.threads)
    m = load_stage_module(a.ckpt, None, "cpu")
    steps = int(m.hparams.maskgit_steps)
    tot = {k: 0 for k in ("n", "chg", "one", "mg", "copy", "one_chg", "mg_chg", "one_same", "mg_same")}
    for split in ("val", "ood"):
        dm = ClipDataModule(a.shards, clip_len=a.clip_len, batch_size=8, num_workers=0, val_steps=a.batches,
                            val_splits=[split])
        dm.setup("validate")
        for batch in dm.val_dataloader():
            ids, actions, z, stride = m._inputs(batch)
            one = m.model.teacher_forced(ids, actions, z, stride).argmax(-1)
            mg = maskgit_teacher_forced(m.model, ids, actions, z, steps)
            for v in a.visible:
                vis[v] = [x + y for x, y in zip(vis[v], partly_visible(m.model, ids, actions, z, stride, v, gen))]
            tgt, prev = ids[:, 1:], ids[:, :-1]
            chg = tgt != prev
            tot["n"] += tgt.numel()
            tot["chg"] += int(chg.sum())
            tot["copy"] += int((~chg).sum())
            for name, pred in (("one", one), ("mg", mg)):
                right = pred == tgt
                tot[name] += int(right.sum())
                tot[name + "_chg"] += int(right[chg].sum())
                tot[name + "_same"] += int(right[~chg].sum())
    n, c = tot["n"], tot["chg"]
    print(f"{a.ckpt}: {n} tokens of {a.batches * 8 * 2} held-out clips (val + OOD), {100 * c / n:.2f}% change frame to frame")
    print(f"copy baseline        {100 * tot['copy'] / n:.3f}%")
    for name, label in (("one", "one step (val/acc)"), ("mg", f"MaskGIT, {steps} steps")):
        print(f"{label:<21}{100 * tot[name] / n:.3f}%  | changed tokens right {100 * tot[name + '_chg'] / max(1, c):.2f}% "
              f"| unchanged kept {100 * tot[name + '_same'] / max(1, n - c):.3f}%")
    for v, (nv, rv, cv) in vis.items():
        print(f"{100 * v:.0f}% of frame t given   hidden {nv} tokens: {100 * rv / max(1, nv):.3f}% vs copy "
              f"{100 * cv / max(1, nv):.3f}% ({100 * (rv - cv) / max(1, nv):+.3f} pt)")
    print(f"dynamics_tf_acc_minus_copy: {100 * (tot['one'] - tot['copy']) / n:+.3f} pt")


if __name__ == "__main__":
    main(sys.argv[1:])
