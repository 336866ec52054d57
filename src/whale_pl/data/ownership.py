"""Which output folders a data writer may resume or replace: only its own, started with the same config, as the
marker ``.whale_collect.json`` it writes first records (writer ``kind``, config hash)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from whale_pl.io import write_json_atomic

MARKER = ".whale_collect.json"
PROJECT = "whale_pl"


def config_hash(config: Any) -> str:
    """Short sha256 of a JSON-serialisable config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim(out: str | Path, kind: str, config: Any) -> None:
    """Record (atomically) that ``kind`` writes ``out`` with ``config``; call before the first shard."""
    write_json_atomic(Path(out) / MARKER, {"project": PROJECT, "kind": kind, "config_hash": config_hash(config),
                                           "config": config}, sort_keys=True)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ownership(out: str | Path, kind: str, config: Any) -> tuple[str, str]:
    """('empty' | 'ours' | 'other_config' | 'foreign', one line on what ``out`` holds) for writer ``kind``
    about to write ``config`` there: only 'empty' and 'ours' may be written without ``overwrite``."""
    out = Path(out)
    if not out.exists():
        return "empty", f"{out} does not exist"
    if not out.is_dir():
        return "foreign", f"{out} is a file, not a folder"
    if not any(out.iterdir()):
        return "empty", f"{out} is empty"
    if not (out / MARKER).exists():
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return "foreign", f"{out} holds {len(entries)} entries ({shown}) and no whale-data marker ({MARKER})"
    m = read_json(out / MARKER)
    if not isinstance(m, dict) or m.get("project") != PROJECT:
        return "foreign", f"{out} holds a {MARKER} not written by whale-data"
    if m.get("kind") != kind:
        return "foreign", f"{out} was written by {m.get('kind')!r}, not {kind!r}"
    want = config_hash(config)
    if m.get("config_hash") != want:
        return "other_config", f"{out} was written with another config (hash {m.get('config_hash')} != {want})"
    return "ours", f"{out} was started by {kind} with this config (hash {want})"
