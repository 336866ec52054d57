"""`whale-data oxe`: convert Open X-Embodiment RLDS datasets to whale_pl shards.

    whale-data oxe --src <root>/<dataset>/<version> --out data_shards/oxe/<dataset> [--size 64]
                   [--camera KEY] [--split train]
    whale-data oxe --root <root> --datasets bridge_dataset,fractal20220817_data:0.5 --out data_shards/oxe
    whale-data oxe --list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from whale_pl.data.oxe import registry as reg
from whale_pl.data.oxe.convert import ConversionError, ConvertOptions, convert_dataset, convert_mixture
from whale_pl.data.oxe.schema import SchemaError
from whale_pl.data.oxe.standardize import RecordError
from whale_pl.data.oxe.tfrecord import TFRecordError
from whale_pl.data.shards import ShardError


def build_parser() -> argparse.ArgumentParser:
    """The ``whale-data oxe`` argument parser."""
    p = argparse.ArgumentParser(prog="whale-data oxe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="one RLDS dataset: <root>/<dataset>/<version>")
    src.add_argument("--root", help="mixture: the root holding <dataset>/<version> directories")
    src.add_argument("--list", action="store_true", help="print the registry and exit")
    p.add_argument("--datasets", help="mixture: comma list of dataset[:weight] (default weight: the "
                                      "registry's mixture weight, else 1)")
    p.add_argument("--out", help="output directory (a dataset; for a mixture, the parent of one "
                                 "directory per dataset plus mixture.json)")
    p.add_argument("--size", type=int, default=64, help="output frame size (square); 0 keeps native")
    p.add_argument("--crop", choices=("center", "pad"), default="center",
                   help="non-square frames: centre-crop (default) or letterbox to a square")
    p.add_argument("--camera", help="primary camera key under steps/observation/ (overrides the registry)")
    p.add_argument("--action-key", help="unregistered dataset: the flat action tensor (e.g. action)")
    p.add_argument("--language-key", help="the instruction key (overrides the registry); 'none': no language")
    p.add_argument("--split", default="train", help="RLDS split(s), comma list (test maps to val)")
    p.add_argument("--stride", type=int, help="frame stride (default: the registry's; 1 keeps all steps)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: min(files, cpus))")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="skip and count corrupt episodes (recorded in the manifest) instead of failing")
    p.add_argument("--episodes-per-shard", type=int, default=64)
    p.add_argument("--max-episodes", type=int, help="per split, only the first N episodes (in file and "
                                                    "record order): e.g. a few in-domain demonstrations")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing output")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-file parts after merging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _registry_table() -> str:
    rows = [("dataset", "camera", "language", "hz", "stride", "gripper")]
    for c in reg.REGISTRY.values():
        rows.append((c.name, c.camera, c.language or "-", f"{c.control_hz:g}", str(c.frame_stride),
                     c.action.gripper_mode))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows)


def _parse_datasets(text: str) -> list[tuple[str, float | None]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, w = item.partition(":")
        try:
            out.append((name, float(w) if w else None))
        except ValueError:
            raise ConversionError(f"--datasets: bad weight in {item!r} (expected name:weight)") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """``whale-data oxe``: convert a dataset or a mixture, or list the registry; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.list:
        print(_registry_table())
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    opts = ConvertOptions(splits=tuple(s.strip() for s in args.split.split(",") if s.strip()),
                          **{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertOptions)
                             if f.name != "splits"})
    try:
        if args.src:
            m = convert_dataset(args.src, args.out, opts, progress=not args.quiet)
            oxe = m["extra"]["oxe"]
            print(f"{args.out}: {m['episodes']} episodes, {m['frames']} frames, frame size "
                  f"{m['frame_size']}, {oxe['corrupt_episodes']} corrupt episodes skipped")
        else:
            if not args.datasets:
                print("error: --root needs --datasets name[:weight],...", file=sys.stderr)
                return 2
            mix = convert_mixture(args.root, _parse_datasets(args.datasets), args.out, opts,
                                  progress=not args.quiet)
            print(json.dumps(mix, indent=1))
    except (ConversionError, SchemaError, RecordError, TFRecordError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
