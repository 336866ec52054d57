"""The TFDS `features.json` schema of an RLDS dataset, flattened to the keys of its tf.train.Example
(``steps/observation/image_0``) with each leaf's shape (per step inside the ``steps`` Dataset). The converter
takes every key and value count from here, never by guessing from a record."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path


class SchemaError(ValueError):
    """features.json is missing, unreadable or not an RLDS schema."""


@dataclass(frozen=True)
class DatasetSchema:
    """The flattened features of one dataset version: key -> shape (-1: unknown dim); ``path``: its features.json."""
    path: str
    features: dict[str, tuple[int, ...]]

    def size(self, key: str) -> int | None:
        """Values per step of a numeric step feature; None if a dimension is unknown."""
        shape = self.features[key]
        return None if any(d < 0 for d in shape) else math.prod(shape)


def _walk(node: dict, prefix: str, out: dict[str, tuple[int, ...]]) -> None:
    if "featuresDict" in node:
        for name, child in node["featuresDict"].get("features", {}).items():
            _walk(child, f"{prefix}/{name}" if prefix else name, out)
    elif "sequence" in node:  # tfds Dataset (RLDS steps) or Sequence
        _walk(node["sequence"]["feature"], prefix, out)
    else:  # image, tensor, text, class label, ...: scalars and text have no dimensions
        leaf = node.get("image") or node.get("tensor") or {}
        out[prefix] = tuple(int(d) for d in (leaf.get("shape") or {}).get("dimensions", []))


def load_schema(version_dir: str | os.PathLike) -> DatasetSchema:
    """Read ``<version_dir>/features.json``."""
    path = Path(version_dir) / "features.json"
    if not path.is_file():
        raise SchemaError(f"{path}: missing; an RLDS dataset directory <root>/<dataset>/<version>/ "
                          "must hold features.json (the TFDS FeaturesDict schema)")
    try:
        root = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: cannot read as JSON: {e}") from e
    out: dict[str, tuple[int, ...]] = {}
    _walk(root, "", out)
    if not any(k.startswith("steps/") for k in out):
        raise SchemaError(f"{path}: no 'steps' Dataset feature; not an RLDS schema")
    return DatasetSchema(str(path), out)
