"""TFRecord framing/CRC, tf.train.Example parsing and features.json reading, without TensorFlow."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from whale_pl.data.oxe.example_proto import parse_example
from whale_pl.data.oxe.schema import SchemaError, load_schema
from whale_pl.data.oxe.tfrecord import TFRecordError, iter_records, masked_crc32c

from rlds_fixtures import build_example, encode_record, write_records  # noqa: E402

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"
needs_bridge = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"real OXE sample data absent: {BRIDGE}")


def test_crc32c_known_vectors():
    # TFRecord's masking (rotate right 15, add 0xa282ead8) of the RFC 3720 / iSCSI check value and of the
    # all-zero 32-byte vector's CRC-32C
    for data, c in ((b"123456789", 0xE3069283), (bytes(32), 0x8A9136AA)):
        assert masked_crc32c(data) == ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


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
    assert f"{p}: record 1 (byte offset 21): truncated record" in str(e.value)


def test_crc_mismatch_detected(tmp_path):
    p = tmp_path / "c.tfrecord"
    write_records(p, [b"aaaa", b"bbbb", b"cccc"])
    raw = bytearray(p.read_bytes())
    off = 20 + 12  # second record's first data byte (record 0 is 8+4+4+4 = 20 bytes)
    assert raw[off:off + 4] == b"bbbb"
    raw[off] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=r"record 1 \(byte offset 20\): data CRC mismatch"):
        list(iter_records(p))
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
    f = schema.features
    assert [f[f"steps/observation/image_{i}"][-1] for i in range(4)] == [3] * 4
    assert f["steps/action"] == (7,) and schema.size("steps/action") == 7
    assert f["steps/is_first"] == () and schema.size("steps/is_first") == 1 and f["steps/language_instruction"] == ()
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
