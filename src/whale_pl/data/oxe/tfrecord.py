"""TFRecord framing with CRC32C checks, reading and writing, without TensorFlow.

A TFRecord file is a sequence of records, each
``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`` (little endian).
The reader checks both CRCs and raises `TFRecordError` naming the file, the record index and the
byte offset at fault; a file that ends inside a record is an error, never a silently shorter read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import google_crc32c

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class TFRecordError(ValueError):
    """A TFRecord file is corrupt: names the file, record index, byte offset and what was expected."""

    def __init__(self, path: str | os.PathLike, index: int, offset: int, message: str):
        self.path, self.index, self.offset, self.message = str(path), index, offset, message
        super().__init__(f"{path}: record {index} (byte offset {offset}): {message}")

    def __reduce__(self):  # survives the trip back from a worker process
        return type(self), (self.path, self.index, self.offset, self.message)


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str | os.PathLike, verify: bool = True) -> Iterator[bytes]:
    """Yield the payload of every record in ``path``, streaming (one record in memory at a time);
    the first damaged record raises its `TFRecordError`."""
    for _, item in iter_records_safe(path, verify):
        if isinstance(item, TFRecordError):
            raise item
        yield item


def encode_record(data: bytes) -> bytes:
    """One framed TFRecord record for ``data``."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


def write_records(path: str | os.PathLike, records: list[bytes] | Iterator[bytes]) -> None:
    """Write ``records`` to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for rec in records:
            f.write(encode_record(rec))
    os.replace(tmp, path)


def iter_records_safe(path: str | os.PathLike, verify: bool = True) -> Iterator[tuple[int, bytes | TFRecordError]]:
    """Like `iter_records`, but yields ``(index, payload)`` or ``(index, TFRecordError)``.

    A data-CRC mismatch leaves the framing intact, so reading goes on with the next record; a bad
    length CRC or a truncated record loses the framing, so that error is the last item yielded.
    """
    path = Path(path)
    with open(path, "rb", buffering=1 << 20) as f:
        index, offset = 0, 0
        while True:
            header = f.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                yield index, TFRecordError(path, index, offset,
                                           f"truncated header: {len(header)} of {_HEADER.size} bytes")
                return
            length, length_crc = _HEADER.unpack(header)
            if verify and masked_crc32c(header[:8]) != length_crc:
                yield index, TFRecordError(path, index, offset,
                                           f"length CRC mismatch (stored {length_crc:#010x}, computed "
                                           f"{masked_crc32c(header[:8]):#010x}); not a TFRecord file or "
                                           "corrupt: framing lost, rest of file unreadable")
                return
            data = f.read(length)
            footer = f.read(_FOOTER.size)
            if len(data) < length or len(footer) < _FOOTER.size:
                yield index, TFRecordError(path, index, offset,
                                           f"truncated record: expected {length} data bytes + 4 CRC "
                                           f"bytes, file has {len(data) + len(footer)}")
                return
            if verify and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
                yield index, TFRecordError(path, index, offset,
                                           f"data CRC mismatch (stored {_FOOTER.unpack(footer)[0]:#010x}, "
                                           f"computed {masked_crc32c(data):#010x})")
            else:
                yield index, data
            index += 1
            offset += _HEADER.size + length + _FOOTER.size
