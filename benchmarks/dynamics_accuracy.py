"""Teacher-forced next-frame token accuracy of a dynamics checkpoint against the copy baseline.

On held-out clips (val and OOD episodes of the checkpoint's demo data), every frame t >= 1 is
predicted from the true frames before it, two ways: one step from a fully masked frame (the
module's ``val/acc``) and with the model's own MaskGIT decoding (``maskgit_steps``, greedy). Both
are set beside the copy-the-previous-frame baseline, and split into tokens that stay the same from
one frame to the next and tokens that change (where all of the gain over copying has to come from).

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


def main(argv: list[str] | None = None) -> None:
    """Score the checkpoint on val and OOD clips; print the table and the last line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/demo/dynamics/checkpoints/best.ckpt")
    p.add_argument("--shards", default="data_shards/metaworld/demo")
    p.add_argument("--clip-len", type=int, default=12)
    p.add_argument("--batches", type=int, default=4, help="batches of 8 clips per split")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    m = load_stage_module(a.ckpt)
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
    print(f"dynamics_tf_acc_minus_copy: {100 * (tot['one'] - tot['copy']) / n:+.3f} pt")


if __name__ == "__main__":
    main(sys.argv[1:])
