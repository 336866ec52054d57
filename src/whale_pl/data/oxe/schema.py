"""The TFDS `features.json` schema of an RLDS dataset, flattened to the keys of its tf.train.Example
(``steps/observation/image_0``; leaves inside the ``steps`` Dataset hold one entry per step). The converter
takes every key and shape from here, never by guessing from a record."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}
_INT_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


class SchemaError(ValueError):
    """features.json is missing, unreadable or holds something the converter cannot read."""


@dataclass(frozen=True)
class FeatureSpec:
    """One leaf of the schema."""
    key: str                 # flattened Example key, e.g. "steps/observation/image_0"
    kind: str                # "image" | "tensor" | "text" | "other"
    shape: tuple[int, ...]   # per step for step features; -1 for unknown dims
    dtype: str               # numpy-style dtype name ("uint8", "float32", "string", ...)
    encoding: str            # "jpeg"/"png" for images; "none"/"bytes"/"zlib" for tensors
    per_step: bool           # lives inside the `steps` Dataset

    @property
    def storage(self) -> str:
        """Which tf.train.Feature list holds it: 'bytes', 'float' or 'int64'."""
        if self.kind in ("image", "text") or self.dtype == "string" or self.encoding not in ("none", ""):
            return "bytes"
        return "float" if self.dtype in _FLOAT_DTYPES else "int64" if self.dtype in _INT_DTYPES else "bytes"

    @property
    def size(self) -> int | None:
        """Values per step (per episode for episode features) for numeric tensors; None if unknown."""
        return None if any(d < 0 for d in self.shape) else math.prod(self.shape)


def _dims(shape_obj: dict | None) -> tuple[int, ...]:
    return tuple(int(d) for d in (shape_obj or {}).get("dimensions", []))


def _walk(node: dict, prefix: str, per_step: bool, out: dict[str, FeatureSpec]) -> None:
    short = node.get("pythonClassName", "").rsplit(".", 1)[-1]
    if "featuresDict" in node:
        for name, child in node["featuresDict"].get("features", {}).items():
            _walk(child, f"{prefix}/{name}" if prefix else name, per_step, out)
    elif "sequence" in node:  # tfds Dataset (RLDS steps) or Sequence
        _walk(node["sequence"]["feature"], prefix, True, out)
    elif "image" in node:
        img = node["image"]
        out[prefix] = FeatureSpec(prefix, "image", _dims(img.get("shape")), img.get("dtype", "uint8"),
                                  img.get("encodingFormat", "png"), per_step)
    elif "text" in node or short == "Text":
        out[prefix] = FeatureSpec(prefix, "text", (), "string", "none", per_step)
    elif "tensor" in node:
        t = node["tensor"]
        dtype = t.get("dtype", "float32")
        # string tensors (e.g. RT-1's natural_language_instruction) are text, stored as bytes
        out[prefix] = FeatureSpec(prefix, "text" if dtype == "string" else "tensor", _dims(t.get("shape")),
                                  dtype, t.get("encoding", "none"), per_step)
    elif "classLabel" in node or short == "ClassLabel":
        out[prefix] = FeatureSpec(prefix, "tensor", (), "int64", "none", per_step)
    else:
        out[prefix] = FeatureSpec(prefix, "other", (), "unknown", "unknown", per_step)


@dataclass(frozen=True)
class DatasetSchema:
    """The flattened features of one dataset version (``path``: its features.json)."""
    path: str
    features: dict[str, FeatureSpec]

    def image_keys(self) -> list[str]:
        """Step image keys with 3 channels (RGB cameras; depth images are left out)."""
        return sorted(k for k, f in self.features.items()
                      if f.per_step and f.kind == "image" and (len(f.shape) == 3 and f.shape[-1] == 3))

    def numeric_step_keys(self, under: str) -> list[str]:
        """Numeric step tensors under ``steps/<under>`` (the key itself or nested beneath it)."""
        full = f"steps/{under}"
        return sorted(k for k, f in self.features.items()
                      if f.per_step and f.kind == "tensor" and f.storage in ("float", "int64")
                      and (k == full or k.startswith(full + "/")))

    def text_step_keys(self) -> list[str]:
        """Step text keys (instruction candidates)."""
        return sorted(k for k, f in self.features.items() if f.per_step and f.kind == "text")


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
    out: dict[str, FeatureSpec] = {}
    _walk(root, "", False, out)
    if not any(f.per_step for f in out.values()):
        raise SchemaError(f"{path}: no 'steps' Dataset feature; not an RLDS schema")
    return DatasetSchema(str(path), out)
