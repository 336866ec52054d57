"""TFRecord framing with CRC32C checks, reading and writing, without TensorFlow.

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


def _header_at(buf, pos: int, size: int, verify: bool) -> tuple[int | None, str]:
    """(payload length, '') if an intact header starts at ``pos`` whose record fits the file, else
    (length or None, what is wrong)."""
    header = buf[pos:pos + _HEADER.size]
    if len(header) < _HEADER.size:
        return None, f"truncated header: {len(header)} of {_HEADER.size} bytes"
    length, length_crc = _HEADER.unpack(header)
    if verify and masked_crc32c(header[:8]) != length_crc:
        return None, (f"length CRC mismatch (stored {length_crc:#010x}, computed {masked_crc32c(header[:8]):#010x}); "
                      "not a TFRecord file or corrupt")
    if pos + _HEADER.size + length + _FOOTER.size > size:
        return length, (f"truncated record: expected {length} data bytes + 4 CRC bytes, file has "
                        f"{size - pos - _HEADER.size}")
    return length, ""


def _intact_at(buf, pos: int, size: int) -> bool:
    length, bad = _header_at(buf, pos, size, True)
    if bad:
        return False
    data = buf[pos + _HEADER.size:pos + _HEADER.size + length]
    return masked_crc32c(data) == _FOOTER.unpack(buf[pos + _HEADER.size + length:pos + _HEADER.size + length + 4])[0]


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
            if _intact_at(buf, pos + int(off), size):
                return pos + int(off)
        pos = last + 1
    return None


def iter_records_safe(path: str | os.PathLike, verify: bool = True) -> Iterator[tuple[int, bytes | TFRecordError]]:
    """Like `iter_records`, but yields ``(index, payload)`` or ``(index, TFRecordError)``.

    A damaged record never takes an intact neighbour with it: after a data-CRC mismatch reading goes
    on at the next record when an intact header follows; after a damaged header, a record that overruns
    the file or a payload that an intact header does not follow, the reader resynchronises at the next
    offset where a complete record with both CRCs intact starts. Each damaged stretch yields one error
    (it may have held more than one record; the converter counts those against dataset_info.json).
    Without ``verify`` nothing can be recovered: the first fault is the last item.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        index, pos = 0, 0
        while pos < size:
            length, bad = _header_at(buf, pos, size, verify)
            nxt = None if length is None else pos + _HEADER.size + length + _FOOTER.size
            if not bad:
                data = buf[pos + _HEADER.size:nxt - _FOOTER.size]
                stored = _FOOTER.unpack(buf[nxt - _FOOTER.size:nxt])[0]
                if not verify or masked_crc32c(data) == stored:
                    yield index, data
                    index, pos = index + 1, nxt
                    continue
                bad = f"data CRC mismatch (stored {stored:#010x}, computed {masked_crc32c(data):#010x})"
                if nxt == size or not _header_at(buf, nxt, size, True)[1]:
                    yield index, TFRecordError(path, index, pos, bad)
                    index, pos = index + 1, nxt
                    continue
            yield index, TFRecordError(path, index, pos, bad)
            index += 1
            pos = _resync(buf, pos + (1 if length is None else _HEADER.size), size) if verify else None
            if pos is None:
                return
    finally:
        buf.close()
