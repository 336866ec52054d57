"""Tokenisation throughput, and what per-frame tokenisation costs the tokenizer's reconstruction.

Builds the token shards of a dataset (``data/tokens.py``: each frame encoded alone) into a temporary folder
with ``--workers`` processes, one torch thread each, and times it end to end (process start and tokenizer
load included): frames/s over the whole dataset. With ``--psnr``, also the reconstruction PSNR of the
held-out episodes' clips on the stage-3 clock (``--clip-len`` frames every ``--stride`` recorded steps),
from the ids of each frame encoded alone against the ids of the clip encoded whole (the causal encoder
then sees the earlier frames of the clip), both decoded as clips; and the share of ids that differ.

    python benchmarks/token_shards.py               # runs/demo's tokenizer on data_shards/metaworld/demo
    python benchmarks/token_shards.py --psnr        # + per-frame against clip-encoded reconstruction

(Not ``benchmarks/tokenize.py``: a script's folder comes first on ``sys.path``, so that name would shadow the
standard library's ``tokenize``, which ``inspect`` imports, for every script in ``benchmarks/``.)

Without a trained tokenizer at ``--tokenizer`` an untrained one is built from ``stages/demo/tokenizer.yaml``
(speed only: ``--psnr`` needs a trained one). Last line: ``tokenize: N frames/s``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def untrained_tokenizer(path: Path) -> Path:
    """A checkpoint of the demo tokenizer config's untrained model, as the stage writes one."""
    from whale_pl.lit.tokenizer_module import TokenizerModule

    args = yaml.safe_load((ROOT / "stages" / "demo" / "tokenizer.yaml").read_text())["model"]["init_args"]
    torch.manual_seed(0)
    module = TokenizerModule(**args)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def clips_of(frames_THWC: np.ndarray, clip_len: int, stride: int) -> torch.Tensor:
    """Non-overlapping clips of ``clip_len`` frames every ``stride`` steps: uint8 [N, T, 3, H, W]."""
    span = clip_len * stride
    starts = np.arange(0, len(frames_THWC) - span + 1, span)
    idx = starts[:, None] + stride * np.arange(clip_len)[None]
    return torch.from_numpy(np.ascontiguousarray(frames_THWC[idx])).permute(0, 1, 4, 2, 3)


def psnr_per_frame(real_NTCHW: torch.Tensor, recon_NTCHW: torch.Tensor) -> torch.Tensor:
    """PSNR [N, T] of images in [-1, 1], on the [0, 1] scale (data range 1)."""
    mse = (((real_NTCHW - recon_NTCHW) / 2) ** 2).flatten(2).mean(-1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction(tok_ckpt: Path, source: Path, splits: list[str], clip_len: int, stride: int) -> dict:
    """Mean PSNR of per-frame and clip-encoded tokens (decoded as clips) on the held-out clips; ids that differ."""
    from whale_pl.data.frames import frames_to_unit
    from whale_pl.data.shards import iter_episodes
    from whale_pl.data.tokens import encode_frames, load_tokenizer

    tok, _, _ = load_tokenizer(tok_ckpt)
    psnr = {"per-frame": [], "clip": []}
    differ, n_clips = [], 0
    for ep in iter_episodes(source, splits=splits):
        frames = clips_of(ep.frames, clip_len, stride)
        if not len(frames):
            continue
        x = frames_to_unit(frames)
        ids = {"per-frame": encode_frames(tok, frames), "clip": tok.encode(x)}
        for k, v in ids.items():
            psnr[k].append(psnr_per_frame(x, tok.decode(v).float()))
        differ.append((ids["per-frame"] != ids["clip"]).float().mean((0, 2, 3)))
        n_clips += len(frames)
    out = {k: torch.cat(v) for k, v in psnr.items()}
    return {"clips": n_clips, **{k: float(v.mean()) for k, v in out.items()},
            "by_t": {k: v.mean(0).tolist() for k, v in out.items()}, "differ_by_t": torch.stack(differ).mean(0).tolist()}


def main(argv: list[str] | None = None) -> None:
    """Time a token build; with ``--psnr`` the reconstruction comparison first; frames/s last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/checkpoints/best.ckpt")
    p.add_argument("--source", default="data_shards/metaworld/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--psnr", action="store_true")
    p.add_argument("--splits", default="val,ood", help="held-out splits of the --psnr comparison")
    p.add_argument("--clip-len", type=int, default=12)
    p.add_argument("--stride", type=int, default=8)
    a = p.parse_args(argv)
    from whale_pl.data.tokens import build_tokens

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="whale_tokenize_")
    tok = Path(a.tokenizer)
    if not tok.is_file():
        if a.psnr:
            raise SystemExit(f"--psnr needs a trained tokenizer; {tok} does not exist")
        tok = untrained_tokenizer(Path(tmp.name) / "tokenizer.ckpt")
        print(f"no {a.tokenizer}: an untrained tokenizer from stages/demo/tokenizer.yaml (speed only)")
    if a.psnr:
        r = reconstruction(tok, Path(a.source), a.splits.split(","), a.clip_len, a.stride)
        print(f"reconstruction PSNR on {r['clips']} held-out clips ({a.splits}; {a.clip_len} frames every {a.stride} "
              f"steps): per-frame {r['per-frame']:.2f} dB, clip-encoded {r['clip']:.2f} dB "
              f"({r['per-frame'] - r['clip']:+.2f} dB)")
        print("  by frame index, per-frame / clip-encoded / ids differing: " + ", ".join(
            f"{p:.2f}/{c:.2f}/{d:.0%}" for p, c, d in zip(r["by_t"]["per-frame"], r["by_t"]["clip"], r["differ_by_t"])))
    t0 = time.perf_counter()
    m = build_tokens(a.source, Path(tmp.name) / "tokens" / Path(a.source).name, tok, workers=a.workers)
    seconds = time.perf_counter() - t0
    tmp.cleanup()
    print(f"{m['frames']} frames of {m['episodes']} episodes in {seconds:.1f}s with {a.workers} worker(s), "
          f"ids {m['tokens']['dtype']} {m['tokens']['grid']}")
    print(f"tokenize: {m['frames'] / seconds:.0f} frames/s")


if __name__ == "__main__":
    sys.exit(main())
