"""`tf.train.Example` parsing with plain protobuf: the message descriptors (field numbers as in TensorFlow's
example.proto and feature.proto) live in a private descriptor pool, never clashing with a loaded TensorFlow."""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

_PACKAGE = "whale_pl_private.tensorflow"
_FILE = f"""
name: "whale_pl_private/example.proto" package: "{_PACKAGE}" syntax: "proto3"
message_type {{ name: "BytesList" field {{ name: "value" number: 1 type: TYPE_BYTES label: LABEL_REPEATED }} }}
message_type {{ name: "FloatList" field {{ name: "value" number: 1 type: TYPE_FLOAT label: LABEL_REPEATED }} }}
message_type {{ name: "Int64List" field {{ name: "value" number: 1 type: TYPE_INT64 label: LABEL_REPEATED }} }}
message_type {{
  name: "Feature" oneof_decl {{ name: "kind" }}
  field {{ name: "bytes_list" number: 1 type: TYPE_MESSAGE label: LABEL_OPTIONAL type_name: ".{_PACKAGE}.BytesList"
          oneof_index: 0 }}
  field {{ name: "float_list" number: 2 type: TYPE_MESSAGE label: LABEL_OPTIONAL type_name: ".{_PACKAGE}.FloatList"
          oneof_index: 0 }}
  field {{ name: "int64_list" number: 3 type: TYPE_MESSAGE label: LABEL_OPTIONAL type_name: ".{_PACKAGE}.Int64List"
          oneof_index: 0 }}
}}
message_type {{
  name: "Features"
  field {{ name: "feature" number: 1 type: TYPE_MESSAGE label: LABEL_REPEATED
          type_name: ".{_PACKAGE}.Features.FeatureEntry" }}
  nested_type {{
    name: "FeatureEntry" options {{ map_entry: true }}
    field {{ name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }}
    field {{ name: "value" number: 2 type: TYPE_MESSAGE label: LABEL_OPTIONAL type_name: ".{_PACKAGE}.Feature" }}
  }}
}}
message_type {{
  name: "Example"
  field {{ name: "features" number: 1 type: TYPE_MESSAGE label: LABEL_OPTIONAL type_name: ".{_PACKAGE}.Features" }}
}}
"""
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(text_format.Parse(_FILE, descriptor_pb2.FileDescriptorProto()))
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.Example"))


def parse_example(data: bytes) -> dict[str, np.ndarray | list]:
    """Serialized `tf.train.Example` -> {key: float32 array | int64 array | list[bytes]} (unset kind: empty float32)."""
    ex = Example()
    ex.ParseFromString(data)
    out: dict[str, np.ndarray | list] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feat.bytes_list.value)
        else:
            out[key] = np.array(getattr(feat, kind).value if kind else [],
                                dtype=np.int64 if kind == "int64_list" else np.float32)
    return out
