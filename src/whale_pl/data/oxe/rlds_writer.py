"""Write small RLDS datasets in the TFDS on-disk layout (features.json, dataset_info.json, TFRecord
files), without TensorFlow: for test fixtures of other schemas and for the conversion benchmark.

Schema nodes are built with `image`, `tensor`, `scalar`, `text` and nested dicts; episodes are given
as flat ``{"steps/...": values}`` dicts (numeric arrays with a leading T axis, or lists of bytes).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from whale_pl.data.oxe.example_proto import build_example
from whale_pl.data.oxe.tfrecord import write_records

_P = "tensorflow_datasets.core.features."


def image(h: int, w: int, fmt: str = "jpeg") -> dict:
    return {"pythonClassName": _P + "image_feature.Image",
            "image": {"shape": {"dimensions": [str(h), str(w), "3"]}, "dtype": "uint8",
                      "encodingFormat": fmt}}


def tensor(shape: tuple[int, ...], dtype: str = "float32") -> dict:
    return {"pythonClassName": _P + "tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": dtype,
                       "encoding": "none"}}


def scalar(dtype: str = "float32") -> dict:
    return {"pythonClassName": _P + "scalar.Scalar", "tensor": {"shape": {}, "dtype": dtype,
                                                                 "encoding": "none"}}


def text() -> dict:
    return {"pythonClassName": _P + "text_feature.Text", "text": {}}


def _fdict(d: dict) -> dict:
    return {"pythonClassName": _P + "features_dict.FeaturesDict",
            "featuresDict": {"features": {k: (_fdict(v) if "pythonClassName" not in v else v)
                                          for k, v in d.items()}}}


def features_json(steps: dict, episode_metadata: dict | None = None) -> dict:
    """An RLDS FeaturesDict: {"steps": Dataset(steps), "episode_metadata": ...}."""
    top = {"steps": {"pythonClassName": _P + "dataset_feature.Dataset",
                     "sequence": {"feature": _fdict(steps), "length": "-1"}}}
    if episode_metadata:
        top["episode_metadata"] = _fdict(episode_metadata)
    return _fdict(top)


def encode_image(frame_HWC: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(frame_HWC).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(frame_HWC).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(version_dir: str | os.PathLike, features: dict,
                  splits: dict[str, list[list[bytes]]], name: str | None = None) -> Path:
    """Write ``features.json``, ``dataset_info.json`` and, per split, one TFRecord file per inner list
    of serialized episodes (``splits = {"train": [[rec, rec], [rec]]}`` -> two files)."""
    d = Path(version_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = name or d.parent.name
    (d / "features.json").write_text(json.dumps(features, indent=1))
    info_splits = []
    for split, files in splits.items():
        n = len(files)
        for i, recs in enumerate(files):
            write_records(d / f"{name}-{split}.tfrecord-{i:05d}-of-{n:05d}", recs)
        info_splits.append({"name": split, "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                            "shardLengths": [str(len(r)) for r in files]})
    info = {"name": name, "fileFormat": "tfrecord", "version": d.name, "splits": info_splits}
    (d / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return d


def episode_record(values: dict[str, np.ndarray | list[bytes]]) -> bytes:
    """Flat {"steps/...": [T, ...] array | list[bytes]} -> a serialized tf.train.Example."""
    return build_example({k: (v if isinstance(v, list) else np.asarray(v).reshape(-1))
                          for k, v in values.items()})
