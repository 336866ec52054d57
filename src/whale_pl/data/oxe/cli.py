"""`whale-data oxe`: convert Open X-Embodiment RLDS datasets to whale_pl shards.
    whale-data oxe --src <root>/<dataset>/<version> --out data_shards/oxe/<dataset> [--size 64] [--split train]
    whale-data oxe --root <root> --datasets bridge_dataset,fractal20220817_data:0.5 --out data_shards/oxe"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from whale_pl.data.oxe.convert import ConversionError, ConvertOptions, convert_dataset, convert_mixture
from whale_pl.data.oxe.schema import SchemaError
from whale_pl.data.oxe.standardize import RecordError
from whale_pl.data.oxe.tfrecord import TFRecordError
from whale_pl.data.shards import ShardError


def _parse_datasets(text: str) -> list[tuple[str, float | None]]:
    """The --datasets argument: ``a:2,b`` -> [("a", 2.0), ("b", None)]."""
    pairs = [item.strip().partition(":") for item in text.split(",") if item.strip()]
    try:
        return [(name, float(w) if w else None) for name, _, w in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad weight in {text!r} (expected name[:weight],...)") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``whale-data oxe`` argument parser."""
    p = argparse.ArgumentParser(prog="whale-data oxe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="one RLDS dataset: <root>/<dataset>/<version>")
    src.add_argument("--root", help="mixture: the root holding <dataset>/<version> directories")
    p.add_argument("--datasets", type=_parse_datasets, help="mixture: comma list of dataset[:weight] (default "
                                                            "weight: the registry's mixture weight, else 1)")
    p.add_argument("--out", required=True, help="output directory (a dataset; for a mixture, the parent of one "
                                                "directory per dataset plus mixture.json)")
    p.add_argument("--size", type=int, default=64, help="output frame size (square, centre-cropped); 0 keeps native")
    p.add_argument("--split", default="train", help="RLDS split(s), comma list (test maps to val)")
    p.add_argument("--max-episodes", type=int, help="per split, only the first N episodes (in file and "
                                                    "record order): e.g. a few in-domain demonstrations")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: min(files, cpus))")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``whale-data oxe``: convert a dataset or a mixture; returns the exit status."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.root and not args.datasets:
        p.error("--root needs --datasets name[:weight],...")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    opts = ConvertOptions(size=args.size, splits=tuple(s.strip() for s in args.split.split(",") if s.strip()),
                          max_episodes=args.max_episodes, workers=args.workers, overwrite=args.overwrite)
    try:
        if args.src:
            m = convert_dataset(args.src, args.out, opts, progress=not args.quiet)
            print(f"{args.out}: {m['episodes']} episodes, {m['frames']} frames, frame size {m['frame_size']}")
        else:
            mix = convert_mixture(args.root, args.datasets, args.out, opts, progress=not args.quiet)
            print(json.dumps(mix, indent=1))
    except (ConversionError, SchemaError, RecordError, TFRecordError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
