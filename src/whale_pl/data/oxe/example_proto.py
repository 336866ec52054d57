"""`tf.train.Example` parsing with plain protobuf.

The message descriptors (Example, Features, Feature, BytesList, FloatList, Int64List, field numbers as
in tensorflow/core/example/{example,feature}.proto) are built here in a private descriptor pool, so
they never clash with a TensorFlow that may be loaded in the same process.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "whale_pl_private.tensorflow"


def _build_example_class():
    f = descriptor_pb2.FileDescriptorProto(name="whale_pl_private/example.proto",
                                           package=_PACKAGE, syntax="proto3")
    FD = descriptor_pb2.FieldDescriptorProto

    def _msg(name: str, fields: list[tuple[str, int, int, int, str | None]]):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fld = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fld.type_name = type_name
        return m

    rep, opt = FD.LABEL_REPEATED, FD.LABEL_OPTIONAL
    _msg("BytesList", [("value", 1, FD.TYPE_BYTES, rep, None)])
    _msg("FloatList", [("value", 1, FD.TYPE_FLOAT, rep, None)])
    _msg("Int64List", [("value", 1, FD.TYPE_INT64, rep, None)])
    feature = _msg("Feature", [
        ("bytes_list", 1, FD.TYPE_MESSAGE, opt, f".{_PACKAGE}.BytesList"),
        ("float_list", 2, FD.TYPE_MESSAGE, opt, f".{_PACKAGE}.FloatList"),
        ("int64_list", 3, FD.TYPE_MESSAGE, opt, f".{_PACKAGE}.Int64List"),
    ])
    feature.oneof_decl.add(name="kind")
    for fld in feature.field:
        fld.oneof_index = 0
    features = _msg("Features", [("feature", 1, FD.TYPE_MESSAGE, rep,
                                 f".{_PACKAGE}.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=FD.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=FD.TYPE_MESSAGE, label=opt,
                    type_name=f".{_PACKAGE}.Feature")
    entry.options.map_entry = True
    _msg("Example", [("features", 1, FD.TYPE_MESSAGE, opt, f".{_PACKAGE}.Features")])

    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName(f"{_PACKAGE}.Example")),
            get(pool.FindMessageTypeByName(f"{_PACKAGE}.Feature")))


Example, Feature = _build_example_class()

# A parsed feature: float32 / int64 array, or a list of byte strings.
FeatureValue = np.ndarray | list


def parse_example(data: bytes) -> dict[str, FeatureValue]:
    """Serialized `tf.train.Example` -> {key: float32 array | int64 array | list[bytes]}.

    A feature whose kind is unset (an empty list) comes back as an empty float32 array.
    """
    ex = Example()
    ex.ParseFromString(data)
    out: dict[str, FeatureValue] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feat.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.array(feat.float_list.value, dtype=np.float32)
        elif kind == "int64_list":
            out[key] = np.array(feat.int64_list.value, dtype=np.int64)
        else:
            out[key] = np.zeros(0, dtype=np.float32)
    return out
