"""TFRecord framing/CRC, tf.train.Example parsing and features.json reading, without TensorFlow."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.schema import SchemaError, load_schema
from whale_pl.data.oxe.tfrecord import TFRecordError, crc32c, iter_records, iter_records_safe, masked_crc32c

from rlds_fixtures import build_example, encode_record, write_records  # noqa: E402  (tests/ is on sys.path under pytest)

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"
needs_bridge = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"real OXE sample data absent: {BRIDGE}")


def test_crc32c_known_vectors():
    # RFC 3720 / iSCSI check value and the all-zero 32-byte vector
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    # TFRecord's masking: rotate right 15, add 0xa282ead8
    c = crc32c(b"abc")
    assert masked_crc32c(b"abc") == ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def test_records_round_trip(tmp_path):
    recs = [b"", b"x", bytes(range(256)) * 40]
    p = tmp_path / "a.tfrecord"
    write_records(p, recs)
    assert list(iter_records(p)) == recs
    assert p.stat().st_size == sum(len(r) + 16 for r in recs)


def test_truncated_record_names_file_and_index(tmp_path):
    p = tmp_path / "t.tfrecord"
    write_records(p, [b"first", b"second-record-payload"])
    data = p.read_bytes()
    p.write_bytes(data[:-6])
    with pytest.raises(TFRecordError) as e:
        list(iter_records(p))
    assert e.value.index == 1 and str(p) in str(e.value) and "truncated" in str(e.value)
    # the safe iterator yields the good record, then the error, then stops
    items = list(iter_records_safe(p))
    assert items[0] == (0, b"first") and isinstance(items[1][1], TFRecordError) and len(items) == 2


def test_crc_mismatch_detected_and_skippable(tmp_path):
    p = tmp_path / "c.tfrecord"
    write_records(p, [b"aaaa", b"bbbb", b"cccc"])
    raw = bytearray(p.read_bytes())
    off = 20 + 12  # second record's first data byte (record 0 is 8+4+4+4 = 20 bytes)
    assert raw[off:off + 4] == b"bbbb"
    raw[off] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=r"record 1 .*data CRC mismatch"):
        list(iter_records(p))
    items = list(iter_records_safe(p))
    assert [i for i, _ in items] == [0, 1, 2]
    assert isinstance(items[1][1], TFRecordError) and items[2][1] == b"cccc"
    # a corrupted length field loses the framing: an error naming record 0
    raw2 = bytearray(encode_record(b"zz"))
    raw2[0] ^= 0xFF
    p.write_bytes(bytes(raw2))
    with pytest.raises(TFRecordError, match=r"record 0 .*length CRC"):
        list(iter_records(p))


def test_example_round_trip():
    feats = {"f": np.array([1.5, -2.0], np.float32), "i": np.array([3, -4, 2**40]),
             "b": np.array([True, False]), "s": [b"hello", b""], "empty": []}
    back = parse_example(build_example(feats))
    np.testing.assert_array_equal(back["f"], feats["f"])
    np.testing.assert_array_equal(back["i"], feats["i"])
    np.testing.assert_array_equal(back["b"], [1, 0])
    assert back["s"] == [b"hello", b""] and back["empty"] == []


def test_private_pool_does_not_touch_default_pool():
    from google.protobuf import descriptor_pool

    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("tensorflow.Example")


@needs_bridge
def test_bridge_records_and_schema():
    schema = load_schema(BRIDGE)
    assert schema.image_keys() == [f"steps/observation/image_{i}" for i in range(4)]
    assert schema.step("action").shape == (7,) and schema.step("action").storage == "float"
    assert schema.step("is_first").storage == "int64" and schema.step("language_instruction").kind == "text"
    recs = list(iter_records(next(BRIDGE.glob("*-train.tfrecord-*"))))
    assert len(recs) == 25
    ex = parse_example(recs[0])
    assert len(ex["steps/observation/image_0"]) == 10 and ex["steps/action"].shape == (70,)
    assert ex["steps/observation/image_0"][0][:2] == b"\xff\xd8"  # JPEG


def test_missing_features_json(tmp_path):
    with pytest.raises(SchemaError, match="features.json: missing"):
        load_schema(tmp_path)
    (tmp_path / "features.json").write_text("{not json")
    with pytest.raises(SchemaError, match="cannot read as JSON"):
        load_schema(tmp_path)


def test_length_field_layout():
    rec = encode_record(b"hello")
    (n,) = struct.unpack("<Q", rec[:8])
    assert n == 5 and rec[12:17] == b"hello"


def test_damaged_record_never_takes_an_intact_neighbour(tmp_path):
    p = tmp_path / "d.tfrecord"
    recs = [b"first" * 20, b"second" * 20, b"third" * 20, b"fourth" * 20]
    write_records(p, recs)
    raw = p.read_bytes()
    starts = np.cumsum([0] + [len(r) + 16 for r in recs])
    # record 1's length field corrupted: framing at record 1 lost, records 2 and 3 still read
    bad = bytearray(raw)
    bad[starts[1]] ^= 0x40
    p.write_bytes(bytes(bad))
    items = list(iter_records_safe(p))
    assert [i for i, _ in items] == [0, 1, 2, 3] and "length CRC" in str(items[1][1])
    assert [x for _, x in items if not isinstance(x, TFRecordError)] == [recs[0], recs[2], recs[3]]
    # 7 bytes cut out of record 1's payload: its CRC fails and no header follows it; resynchronised
    p.write_bytes(raw[:starts[1] + 20] + raw[starts[1] + 27:])
    items = list(iter_records_safe(p))
    assert [x for _, x in items if not isinstance(x, TFRecordError)] == [recs[0], recs[2], recs[3]]
    assert len(items) == 4
    # a damaged last record: the intact ones before it are kept, nothing invented after it
    bad = bytearray(raw)
    bad[starts[3] + 13] ^= 0x01
    p.write_bytes(bytes(bad))
    items = list(iter_records_safe(p))
    assert [x for _, x in items[:3]] == recs[:3] and "data CRC mismatch" in str(items[3][1]) and len(items) == 4
