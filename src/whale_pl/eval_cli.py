"""`whale eval video|gifs ...`: what `EvalCallback` logs, offline, and rollout GIFs (`whale_pl.rollout.gif`)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from whale_pl.callbacks import call_eval_videos
from whale_pl.data.datamodule import ClipDataModule
from whale_pl.data.shards import ShardError
from whale_pl.io import write_json_atomic
from whale_pl.lit.checkpoint import load_module, read_checkpoint
from whale_pl.lit.handoff import CLASS_KEY, SPEC_KEYS, HandoffError, check_data_spec
from whale_pl.metrics.fvd import FVD, make_fvd
from whale_pl.metrics.video import VideoEvaluator
from whale_pl.rollout.gif import write_gifs


def load_stage_module(ckpt_path: str | os.PathLike, device: str = "cpu"):
    """A LightningModule checkpoint in eval mode, of the class stamped into it (`whale_pl.lit.handoff.CLASS_KEY`)."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if (class_path := ckpt.get(CLASS_KEY)) is None:
        raise ValueError(f"{path}: no {CLASS_KEY!r} entry naming the module class")
    mod, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path}: cannot import module class {class_path!r} ({e})") from e
    return load_module(path, cls, map_location=device, ckpt=ckpt).eval()


def evaluate_video(module: Any, shards: str | os.PathLike, num_clips: int = 64, clip_len: int = 16,
                   split: str = "val", device: str = "cpu") -> dict:
    """PSNR/SSIM/FVD of `module.eval_videos` on `num_clips` clips of the `split` of a shard set; for a module with
    `copy_videos` (dynamics) the same figures of copying the last real frame, as `copy_psnr` etc."""
    stored = dict(getattr(module, "hparams", {})).get("data_spec")
    stride = int((stored or {}).get("frame_stride", 1))  # clips on the clock the model was trained on
    dm = ClipDataModule(str(shards), clip_len=clip_len, frame_stride=stride, batch_size=8, num_workers=0,
                        val_steps=math.ceil(num_clips / 8), val_splits=[split], seed=0, rank=0, world_size=1)
    dm.setup("validate")
    check_data_spec(stored, dm.data_spec, f"evaluating on {shards}", [k for k in SPEC_KEYS if k in dm.data_spec])
    if num_clips > (available := dm.val_clip_count()):
        raise ShardError(f"{shards}: split {split!r} holds {available} distinct clips of {clip_len} frames at stride "
                         f"{stride}; --num-clips {num_clips} would repeat clips")
    evaluator = VideoEvaluator(make_fvd(device))
    copy_fvd = FVD(evaluator.fvd.i3d, device) if evaluator.fvd else None  # one I3D for both
    copy = VideoEvaluator(copy_fvd) if hasattr(module, "copy_videos") else None
    module = module.to(device).eval()
    with tqdm(total=num_clips, desc="eval video", unit="clip", disable=None) as bar:
        for batch in dm.val_dataloader():
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            real, fake = call_eval_videos(module, batch)
            need = num_clips - evaluator.num_clips
            evaluator.update(real[:need], fake[:need])
            if copy is not None:  # the last real frame held, on the same clips
                copy.update(real[:need], module.copy_videos(batch, real)[:need])
            bar.update(min(need, len(real)))
            if evaluator.num_clips >= num_clips:
                break
    baseline = {f"copy_{k}": v for k, v in (copy.compute() if copy else {}).items() if k in ("psnr", "ssim", "fvd")}
    return evaluator.compute() | baseline | dict(stage=type(module).__name__, split=split, clip_len=clip_len,
                                                 frame_stride=stride, shards=str(shards))


def _parser() -> argparse.ArgumentParser:
    """``whale eval video|gifs``' arguments."""
    p = argparse.ArgumentParser(prog="whale eval", description="Evaluate a stage checkpoint on a shard set.")
    sub = p.add_subparsers(dest="cmd", required=True)
    video = sub.add_parser("video", help="PSNR, SSIM and FVD of a checkpoint on validation clips of a shard set "
                           "(the EvalCallback's figures, offline)")
    gifs = sub.add_parser("gifs", help="real-against-imagined rollout GIFs of held-out episodes with the retracing "
                          "uncertainty and the true error under them")
    for q in (video, gifs):
        q.add_argument("--ckpt", required=True, help="stage checkpoint (.ckpt; gifs: a dynamics stage)")
        q.add_argument("--shards", required=True, help="dataset directory (shards + manifest.json)")
        q.add_argument("--device", default="cpu")
    video.add_argument("--num-clips", type=int, default=64, help="clips: at most the split's distinct clips")
    video.add_argument("--clip-len", type=int, default=16, help="frames per clip (FVD needs >= 9)")
    video.add_argument("--split", default="val", help="manifest split to take clips from (val, ood, train)")
    video.add_argument("--out", default=None, help="write the metrics as JSON here (atomic)")
    gifs.add_argument("--out", required=True, help="directory for the GIFs and index.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """``whale eval {video,gifs} ...``; 2 on a usage, data or hand-off error (one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return int(e.code or 0)
    try:
        if a.cmd == "gifs":
            index = write_gifs(a.ckpt, a.shards, a.out, "whale eval " + shlex.join(argv), a.device)
            print(f"[gifs] wrote {len(index['clips'])} GIFs and {Path(a.out) / 'index.json'} in "
                  f"{index['seconds']:.1f} s")
            return 0
        if a.num_clips < 1 or a.clip_len < 2:
            raise ValueError(f"--num-clips must be >= 1 and --clip-len >= 2, got {a.num_clips} and {a.clip_len}")
        if a.out and Path(a.out).is_dir():
            raise ValueError(f"--out {a.out} is a directory; give the path of the metrics JSON file to write")
        module = load_stage_module(a.ckpt, device=a.device)
        out = evaluate_video(module, a.shards, a.num_clips, a.clip_len, a.split, a.device)
    except (ValueError, FileNotFoundError, HandoffError) as e:  # a usage, data or hand-off error: one line
        print(f"whale eval {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    out["ckpt"] = str(a.ckpt)
    if a.out:
        write_json_atomic(a.out, out)
    print(json.dumps({k: out[k] for k in ("psnr", "ssim", "fvd", "copy_psnr", "copy_ssim", "copy_fvd", "num_clips")
                      if k in out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
