"""``whale-data``: dataset commands.

    whale-data metaworld --config stages/demo/data.yaml [--workers N] [--overwrite]
    whale-data oxe ...                     # Open X-Embodiment conversion (whale_pl.data.oxe.cli)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def _metaworld(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="whale-data metaworld",
                                description="Collect Meta-World behavior datasets into shards.")
    p.add_argument("--config", required=True, help="dataset YAML (stages/<scale>/data.yaml)")
    p.add_argument("--workers", type=int, help="render worker processes (default: the config's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what the config's out holds (another config's collection, or files whale-data did "
                        "not write)")
    a = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from whale_pl.data.metaworld import CollectConfig, ensure_collected

    try:
        cfg = CollectConfig.from_yaml(a.config, workers=a.workers)
        m = ensure_collected(cfg, overwrite=a.overwrite)
    except ValueError as e:  # bad names/config and ShardError: one clear line, no traceback
        print(f"whale-data metaworld: error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.out}: {m['episodes']} episodes, {m['frames']} frames, {len(m['shards'])} shards, "
          f"frames {m['frame_size']}, splits " + json.dumps({k: v['episodes'] for k, v in m['splits'].items()}))
    print(f"{'policy':28s} {'family':7s} {'split':10s} {'episodes':>8s} {'return':>14s} {'success':>7s}")
    for name, pol in m["policies"].items():
        split = ",".join(sorted(pol["splits"]))
        print(f"{name:28s} {pol['family']:7s} {split:10s} {pol['episodes']:8d} "
              f"{pol['return_mean']:7.1f}±{pol['return_std']:<6.1f} {pol['success_rate']:7.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``whale-data``: dispatch to a subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "metaworld":
        return _metaworld(rest)
    if cmd == "oxe":
        from whale_pl.data.oxe.cli import main as oxe_main  # lazy: only OXE users pay for it

        return oxe_main(rest)
    print(f"whale-data: unknown command {cmd!r}; valid: ['metaworld', 'oxe']", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
