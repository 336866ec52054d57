"""TFRecord reading with CRC32C checks, without TensorFlow. Each record is ``uint64 length | uint32
masked_crc32c(length) | data | uint32 masked_crc32c(data)`` (little endian); a damaged or truncated record
raises `TFRecordError` naming the file, record index and byte offset."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import google_crc32c

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class TFRecordError(ValueError):
    """A TFRecord file is corrupt: the message names the file, record index, byte offset and the fault."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli): rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the payload of every record in ``path``, streaming (one record in memory at a time)."""
    with open(path, "rb") as f:
        index = pos = 0
        while header := f.read(_HEADER.size):
            at = f"{path}: record {index} (byte offset {pos})"
            if len(header) < _HEADER.size:
                raise TFRecordError(f"{at}: truncated header: {len(header)} of {_HEADER.size} bytes")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{at}: length CRC mismatch (stored {length_crc:#010x}, computed "
                                    f"{masked_crc32c(header[:8]):#010x}); not a TFRecord file or corrupt")
            body = f.read(length + _FOOTER.size)
            if len(body) < length + _FOOTER.size:
                raise TFRecordError(f"{at}: truncated record: expected {length} data bytes + 4 CRC bytes, "
                                    f"file has {len(body)}")
            data, (stored,) = body[:length], _FOOTER.unpack(body[length:])
            if masked_crc32c(data) != stored:
                raise TFRecordError(f"{at}: data CRC mismatch (stored {stored:#010x}, "
                                    f"computed {masked_crc32c(data):#010x})")
            yield data
            index, pos = index + 1, pos + _HEADER.size + length + _FOOTER.size
