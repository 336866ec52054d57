"""What a fixed CPU time budget of dynamics training reaches: held-out cross-entropy and accuracy.

Trains the stage-3 module of ``stages/<scale>/dynamics.yaml`` (model section, with ``--set`` overrides)
on the YAML's datamodule with a real Lightning Trainer for ``--minutes`` of wall time (no validation
while training; the lr schedule anneals by time as in the stage), then scores it teacher-forced on the
first ``--val-batches`` batches of 8 held-out clips: every frame t >= 1 predicted in one step from a
fully masked frame given the true frames before it. Reported beside the copy-the-previous-frame
baseline: accuracy, cross-entropy (beside that of the best smoothed copy: 1 - r on the previous id and r
spread evenly over the others, r the held-out change rate), and for the tokens that change, how often the prediction is right,
the probability left on the old id, and how often the best *new* id (the old one excluded) is right.
Compare settings side by side, e.g.

    .venv/bin/python benchmarks/dynamics_budget.py                            # the stage config
    .venv/bin/python benchmarks/dynamics_budget.py --set change_weight=1.0    # without change weighting

Last line: ``dynamics_budget_val_ce: <held-out cross-entropy> nats``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from train_step import import_path, parse_set  # sibling benchmark: the same --set and class_path helpers

ROOT = Path(__file__).resolve().parents[1]


def bootstrap_ci(per_clip: list[tuple[int, int]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of accuracy minus copy (points) over clips resampled with replacement: tokens of
    one clip are not independent, clips are."""
    import numpy as np

    d = np.array(per_clip, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    stats = 100 * d[idx, 0].sum(1) / d[idx, 1].sum(1)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


@torch.no_grad()
def teacher_forced_stats(module, batches) -> dict[str, float]:
    """Held-out teacher-forced figures of a DynamicsModule on a list of batches."""
    module.eval()
    n = chg = right = copy = chg_right = top1_new = 0
    ce = p_old_chg = 0.0
    per_clip = []  # (right - copy, tokens) of each held-out clip: the bootstrap unit
    for batch in batches:
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ids, actions, z, stride = module._inputs(batch)
        logp = module.model.teacher_forced(ids, actions, z, stride).float().log_softmax(-1)
        tgt, prev = ids[:, 1:], ids[:, :-1]
        changed = tgt != prev
        pred = logp.argmax(-1)
        n += tgt.numel()
        chg += int(changed.sum())
        right += int((pred == tgt).sum())
        copy += int((~changed).sum())
        per_clip += [(int(r) - int(c), tgt[0].numel()) for r, c in
                     zip((pred == tgt).flatten(1).sum(1).tolist(), (~changed).flatten(1).sum(1).tolist())]
        chg_right += int((pred == tgt)[changed].sum())
        ce -= logp.gather(-1, tgt[..., None]).sum().item()
        p_old_chg += logp.gather(-1, prev[..., None])[..., 0].exp()[changed].sum().item()
        new_best = logp.scatter(-1, prev[..., None], float("-inf")).argmax(-1)
        top1_new += int((new_best == tgt)[changed].sum())
    c = max(chg, 1)
    V = module.model.codebook_size
    rate = min(max(chg / n, 1e-9), 1 - 1e-9)
    # the best smoothed copy: 1 - rate on the old id, rate spread evenly over the other V - 1 ids
    smoothed_copy_ce = -(1 - rate) * math.log(1 - rate) - rate * math.log(rate / (V - 1))
    lo, hi = bootstrap_ci(per_clip)
    return {"tokens": n, "clips": len(per_clip), "acc_minus_copy_ci95_pt": (lo, hi),
            "changing_share": chg / n, "acc": right / n, "copy_acc": copy / n,
            "smoothed_copy_ce": smoothed_copy_ce,
            "acc_minus_copy_pt": 100 * (right - copy) / n, "ce": ce / n, "changing_right": chg_right / c,
            "changing_p_old_id": p_old_chg / c, "changing_best_new_id_right": top1_new / c}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override model init_args")
    p.add_argument("--val-batches", type=int, default=4, help="held-out batches of 8 clips (val split)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--sticky-margin", type=float, default=None,
                   help="tokenize with this hysteresis margin instead of the tokenizer checkpoint's (VideoTokenizer.sticky_margin)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (the issue's budget) or gpu")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override datamodule init_args, e.g. batch_size=32 num_workers=8")
    p.add_argument("--precision", help="Lightning precision (default: the YAML's trainer.precision), e.g. 32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="also write the trained module's checkpoint here (rescoring, dynamics_accuracy.py)")
    p.add_argument("--ood", action="store_true", help="also score the OOD-family episodes (same figures)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = yaml.safe_load((ROOT / "stages" / a.scale / "dynamics.yaml").read_text())
    margs = {**cfg["model"]["init_args"], **parse_set(a.set)}
    margs.pop("intra_op_threads", None)  # --threads decides
    dcfg = cfg["data"]
    L.seed_everything(a.seed, verbose=False)
    data_args = {**dcfg.get("init_args", {}), **parse_set(a.data)}
    dm = import_path(dcfg["class_path"])(**data_args)
    dm.setup("fit")
    module = import_path(cfg["model"]["class_path"])(**margs, data_spec=dm.data_spec)
    if a.sticky_margin is not None:
        module.tokenizer.model.sticky_margin = a.sticky_margin
    tcfg = cfg["trainer"]
    trainer = L.Trainer(
        accelerator=a.accelerator, devices=1, precision=a.precision or tcfg.get("precision", "32-true"),
        gradient_clip_val=tcfg.get("gradient_clip_val"), max_steps=int(margs.get("max_steps") or 10**6),
        max_time={"seconds": int(a.minutes * 60)}, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    if a.save:
        trainer.save_checkpoint(a.save)
        print(f"saved the trained module to {a.save}")

    def held_out(split: str) -> dict:
        vdm = import_path(dcfg["class_path"])(**{**data_args, "batch_size": 8, "num_workers": 0,
                                                 "val_steps": a.val_batches, "val_splits": [split]})
        vdm.setup("validate")
        return teacher_forced_stats(module, list(vdm.val_dataloader()))

    stats = held_out("val")
    print(f"stages/{a.scale}/dynamics.yaml with {a.set or 'no overrides'}: {trainer.global_step} steps in "
          f"{seconds:.0f} s (sticky margin {module.tokenizer.model.sticky_margin}, {a.accelerator}, {trainer.precision}, {a.threads} thread(s), data {a.data or 'as configured'}); held-out: {stats['tokens']} tokens, "
          f"{100 * stats['changing_share']:.2f}% change from the frame before")
    print(f"  teacher-forced acc {100 * stats['acc']:.3f}% vs copy {100 * stats['copy_acc']:.3f}% "
          f"({stats['acc_minus_copy_pt']:+.3f} pt, 95% interval over {stats['clips']} clips "
          f"[{stats['acc_minus_copy_ci95_pt'][0]:+.3f}, {stats['acc_minus_copy_ci95_pt'][1]:+.3f}]); cross-entropy "
          f"{stats['ce']:.4f} vs {stats['smoothed_copy_ce']:.4f} for the best smoothed copy")
    print(f"  changing tokens: right {100 * stats['changing_right']:.2f}%, probability left on the old id "
          f"{stats['changing_p_old_id']:.3f}, best new id right {100 * stats['changing_best_new_id_right']:.1f}%")
    if a.ood:
        o = held_out("ood")
        print(f"  OOD families: acc {100 * o['acc']:.3f}% vs copy {100 * o['copy_acc']:.3f}% ({o['acc_minus_copy_pt']:+.3f} pt, "
              f"95% interval [{o['acc_minus_copy_ci95_pt'][0]:+.3f}, {o['acc_minus_copy_ci95_pt'][1]:+.3f}]; "
              f"{o['tokens']} tokens), cross-entropy {o['ce']:.4f} vs {o['smoothed_copy_ce']:.4f}")
    print(f"dynamics_budget_val_ce: {stats['ce']:.4f} nats")


if __name__ == "__main__":
    main(sys.argv[1:])
