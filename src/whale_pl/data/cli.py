"""``whale-data``: dataset commands.

    whale-data metaworld --config stages/demo/data.yaml [--out DIR] [--workers N] [--overwrite]
    whale-data metaworld --tasks door-open-v3 push-v3 --policies expert noise_0.1 --out DIR
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
    p.add_argument("--config", help="dataset YAML (stages/<scale>/data.yaml); flags override its keys")
    p.add_argument("--tasks", nargs="+", help="without --config: Meta-World tasks (other keys: their defaults)")
    p.add_argument("--policies", nargs="+", dest="train_policies",
                   help="training behavior policies, e.g. expert noise_0.1")
    p.add_argument("--out", help="output dataset directory")
    p.add_argument("--workers", type=int, help="render worker processes (default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (another config's collection, or files whale-data did not write)")
    a = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from whale_pl.data.metaworld import CollectConfig, ensure_collected

    over = {k: v for k, v in vars(a).items() if k not in ("config", "overwrite")}  # CollectConfig keys
    try:
        if a.config:
            cfg = CollectConfig.from_yaml(a.config, **over)
        else:
            if not a.tasks or not a.train_policies or not a.out:
                p.error("without --config, --tasks, --policies and --out are required")
            cfg = CollectConfig(**{k: v for k, v in over.items() if v is not None})
        m = ensure_collected(cfg, overwrite=a.overwrite)
    except ValueError as e:  # bad names/config and ShardError: one clear line, no traceback
        print(f"whale-data metaworld: error: {e}", file=sys.stderr)
        return 2
    _summary(cfg.out, m)
    return 0


def _summary(path: str, m: dict) -> None:
    print(f"{path}: {m['episodes']} episodes, {m['frames']} frames, {len(m['shards'])} shards, "
          f"frames {m['frame_size']}, splits " + json.dumps({k: v['episodes'] for k, v in m['splits'].items()}))
    print(f"{'policy':28s} {'family':7s} {'split':10s} {'episodes':>8s} {'return':>14s} {'success':>7s}")
    for name, p in m["policies"].items():
        split = ",".join(sorted(p["splits"]))
        print(f"{name:28s} {p['family']:7s} {split:10s} {p['episodes']:8d} "
              f"{p['return_mean']:7.1f}±{p['return_std']:<6.1f} {p['success_rate']:7.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    """``whale-data``: dispatch to a subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"metaworld": _metaworld}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "oxe":
        from whale_pl.data.oxe.cli import main as oxe_main  # lazy: only OXE users pay for it

        return oxe_main(rest)
    if cmd not in cmds:
        print(f"whale-data: unknown command {cmd!r}; valid: {sorted(cmds) + ['oxe']}", file=sys.stderr)
        return 2
    return cmds[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
