"""TFRecord reading with CRC32C checks, without TensorFlow.

A TFRecord file is a sequence of records, each
``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`` (little endian).
The reader checks both CRCs and raises `TFRecordError` naming the file, the record index and the
byte offset at fault; a file that ends inside a record is an error, never a silently shorter read.
`iter_records_safe` reports each damaged record and goes on with the intact records after it.
"""

from __future__ import annotations

import mmap
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


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the payload of every record in ``path``, streaming (one record in memory at a time);
    the first damaged record raises its `TFRecordError`."""
    for _, item in iter_records_safe(path):
        if isinstance(item, TFRecordError):
            raise item
        yield item


def _read_at(buf, pos: int, size: int) -> tuple[int | None, bytes | None, str]:
    """(payload length, payload, '') for an intact record at ``pos``, else what is wrong: the length is
    None for a damaged header, the payload None for a damaged header or a record that overruns the file."""
    header = buf[pos:pos + _HEADER.size]
    if len(header) < _HEADER.size:
        return None, None, f"truncated header: {len(header)} of {_HEADER.size} bytes"
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        return None, None, (f"length CRC mismatch (stored {length_crc:#010x}, computed "
                            f"{masked_crc32c(header[:8]):#010x}); not a TFRecord file or corrupt")
    end = pos + _HEADER.size + length
    if end + _FOOTER.size > size:
        return length, None, (f"truncated record: expected {length} data bytes + 4 CRC bytes, file has "
                              f"{size - pos - _HEADER.size}")
    data, (stored,) = buf[pos + _HEADER.size:end], _FOOTER.unpack(buf[end:end + _FOOTER.size])
    if masked_crc32c(data) != stored:
        return length, data, f"data CRC mismatch (stored {stored:#010x}, computed {masked_crc32c(data):#010x})"
    return length, data, ""


def _resync(buf, start: int, size: int, chunk: int = 1 << 20) -> int | None:
    """The first offset >= ``start`` where a complete record with both CRCs intact begins (None: none).
    Candidates are offsets whose length field fits the rest of the file (found with numpy a chunk at a
    time); only those are checked with CRCs."""
    import numpy as np

    pos = start
    while pos + _HEADER.size + _FOOTER.size <= size:
        last = min(size - _HEADER.size - _FOOTER.size, pos + chunk - 1)  # candidate offsets pos..last
        raw = np.frombuffer(bytes(buf[pos:last + 8]), np.uint8)
        lengths = np.lib.stride_tricks.sliding_window_view(raw, 8).copy().view("<u8")[:, 0]
        room = size - _HEADER.size - _FOOTER.size - np.arange(pos, last + 1, dtype=np.int64)
        for off in np.flatnonzero(lengths <= room.astype(np.uint64)):
            if not _read_at(buf, pos + int(off), size)[2]:
                return pos + int(off)
        pos = last + 1
    return None


def iter_records_safe(path: str | os.PathLike) -> Iterator[tuple[int, bytes | TFRecordError]]:
    """Like `iter_records`, but yields ``(index, payload)`` or ``(index, TFRecordError)``: a damaged record
    never takes an intact neighbour with it. After a data-CRC mismatch reading goes on at the next record
    when an intact header follows; otherwise it resynchronises at the next offset where a complete record
    with both CRCs intact starts. Each damaged stretch (maybe several records) yields one error."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        index, pos = 0, 0
        while pos < size:
            length, data, bad = _read_at(buf, pos, size)
            yield index, (TFRecordError(path, index, pos, bad) if bad else data)
            index += 1
            nxt = None if length is None else pos + _HEADER.size + length + _FOOTER.size
            if data is not None and (not bad or nxt == size or _read_at(buf, nxt, size)[1] is not None):
                pos = nxt
            else:
                pos = _resync(buf, pos + (1 if length is None else _HEADER.size), size)
                if pos is None:
                    return
    finally:
        buf.close()
