"""Write small RLDS datasets in the TFDS on-disk layout (features.json, dataset_info.json, TFRecord
files), without TensorFlow: test fixtures of other schemas, and the source of the conversion benchmark.

Schema nodes are built with `image`, `tensor`, `scalar`, `text` and nested dicts; episodes are given
as flat ``{"steps/...": values}`` dicts (numeric arrays with a leading T axis, or lists of bytes).
TFRecord framing and ``tf.train.Example`` encoding are the inverses of ``whale_pl.data.oxe``'s readers.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from whale_pl.data.oxe.example_proto import Example
from whale_pl.data.oxe.tfrecord import masked_crc32c

_P = "tensorflow_datasets.core.features."


def image(h: int, w: int, fmt: str = "jpeg") -> dict:
    """An image feature node (HxWx3 uint8)."""
    return {"pythonClassName": _P + "image_feature.Image",
            "image": {"shape": {"dimensions": [str(h), str(w), "3"]}, "dtype": "uint8",
                      "encodingFormat": fmt}}


def tensor(shape: tuple[int, ...], dtype: str = "float32") -> dict:
    """A tensor feature node."""
    return {"pythonClassName": _P + "tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": dtype,
                       "encoding": "none"}}


def scalar(dtype: str = "float32") -> dict:
    """A scalar feature node."""
    return {"pythonClassName": _P + "scalar.Scalar", "tensor": {"shape": {}, "dtype": dtype,
                                                                 "encoding": "none"}}


def text() -> dict:
    """A text feature node."""
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
    """One frame as JPEG or PNG bytes."""
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


def encode_record(data: bytes) -> bytes:
    """One framed TFRecord record for ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def write_records(path: str | os.PathLike, records) -> None:
    """Write ``records`` (bytes) to ``path`` as a TFRecord file."""
    with open(path, "wb") as f:
        for rec in records:
            f.write(encode_record(rec))


def build_example(features: dict) -> bytes:
    """{key: floats | ints | list[bytes]} -> serialized `tf.train.Example`.

    numpy floating arrays become float_list, integer/bool arrays int64_list, lists of bytes bytes_list.
    """
    ex = Example()
    for key, value in features.items():
        feat = ex.features.feature[key]
        if isinstance(value, (list, tuple)) and (not value or isinstance(value[0], bytes)):
            feat.bytes_list.value.extend(value)
            if not value:
                feat.bytes_list.SetInParent()
            continue
        arr = np.asarray(value).reshape(-1)
        if np.issubdtype(arr.dtype, np.floating):
            feat.float_list.value.extend(arr.astype(np.float32).tolist())
            feat.float_list.SetInParent()
        elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            feat.int64_list.value.extend(arr.astype(np.int64).tolist())
            feat.int64_list.SetInParent()
        else:
            raise TypeError(f"feature {key!r}: cannot encode dtype {arr.dtype}")
    return ex.SerializeToString()


def episode_record(values: dict[str, np.ndarray | list[bytes]]) -> bytes:
    """Flat {"steps/...": [T, ...] array | list[bytes]} -> a serialized tf.train.Example."""
    return build_example({k: (v if isinstance(v, list) else np.asarray(v).reshape(-1))
                          for k, v in values.items()})
