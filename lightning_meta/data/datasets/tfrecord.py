"""TFRecord files and ``tf.train.Example`` records, read and written without TensorFlow.

A TFRecord file is a sequence of records, each framed as ``u64 length | u32 masked CRC-32C of the length bytes | data |
u32 masked CRC-32C of the data`` (little-endian). The data of a Meta-Dataset record is a serialized
``tf.train.Example`` (a protocol buffer) whose features are ``image`` (the encoded image bytes) and ``label``
(int64). This module frames and unframes records, checks both CRCs (``google-crc32c``: a 37 KB wheel with the
hardware CRC instruction, 26 GB/s here, Apache-2.0 like this package; the ``crc32c`` package is as fast but LGPL, and
``tfrecord``/``protobuf`` would add a generated message class to parse two fields) and parses and writes the
``Example`` wire format itself (about 60 lines: three nested length-delimited messages and three list kinds).

Every error names the file, the byte offset of the record's frame and what to do.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import google_crc32c
import numpy as np

Feature = Union[list[bytes], list[int], list[float]]

if google_crc32c.implementation != "c":  # a platform without its wheel: a pure-Python CRC, ~300x slower
    warnings.warn("google-crc32c runs its pure-Python fallback here: checking TFRecord CRCs will be ~300x slower. "
                  "Install a google-crc32c wheel built for this platform (pip install --force-reinstall "
                  "google-crc32c) or a C compiler so pip can build one.", RuntimeWarning, stacklevel=2)


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C of ``data``: the CRC rotated right by 15 bits plus ``0xa282ead8`` (mod 2^32)."""
    crc = google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _damaged(path: Union[str, Path], frame: int, what: str) -> ValueError:
    return ValueError(f"The TFRecord file {path} is damaged at the record whose frame starts at byte {frame}: {what}. "
                      "Restore the file from the source you copied or converted it from (a partial copy or a disk "
                      "error), or run the conversion again for this class.")


def frame_record(data: bytes) -> bytes:
    """One record as the TFRecord framing stores it."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def write_tfrecord(path: Union[str, Path], records: Iterable[bytes]) -> int:
    """Write ``records`` (already serialized, e.g. by :func:`encode_example`) to a TFRecord file; returns how many.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "0.tfrecords"
        >>> write_tfrecord(path, [encode_example({"image": [b"abc"], "label": [0]})])
        1
        >>> offsets, lengths = scan_tfrecord(path)
        >>> parse_example(read_record(path, int(offsets[0]), int(lengths[0])))
        {'image': [b'abc'], 'label': [0]}
    """
    count = 0
    with open(path, "wb") as f:
        for data in records:
            f.write(frame_record(data))
            count += 1
    return count


def scan_tfrecord(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """The byte offset of every record's data in a TFRecord file and its length (``int64 [n]`` each), reading only the
    frames: each length field is checked against its CRC, and a file that ends inside a record is an error. (The data's
    own CRC is checked when the record is read: :func:`read_record`.)"""
    size = os.path.getsize(path)
    offsets, lengths = [], []
    pos = 0
    with open(path, "rb", buffering=1 << 16) as f:
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise _damaged(path, pos, f"the file ends {size - pos} bytes into the record's 12-byte header "
                                          f"(it is {size} bytes long: truncated)")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise _damaged(path, pos, "the record's length field fails its CRC-32C check")
            end = pos + 16 + length
            if end > size:
                raise _damaged(path, pos, f"the record says it holds {length} bytes, but the file ends {size - pos - 12} "
                                          f"bytes after its header (it is {size} bytes long: truncated)")
            offsets.append(pos + 12)
            lengths.append(length)
            pos = end
            f.seek(end)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def check_record(path: Union[str, Path], offset: int, framed: bytes) -> bytes:
    """The data of a record read as ``data + u32 CRC`` from ``offset`` (its data's offset), its CRC checked."""
    if len(framed) < 4:
        raise _damaged(path, offset - 12, "the file ends inside the record")
    data, (crc,) = framed[:-4], struct.unpack("<I", framed[-4:])
    if masked_crc(data) != crc:
        raise _damaged(path, offset - 12, "the record's data fails its CRC-32C check")
    return data


def read_record(path: Union[str, Path], offset: int, length: int) -> bytes:
    """The data of the record at ``offset`` (of its data, as :func:`scan_tfrecord` gives it), CRC checked."""
    with open(path, "rb") as f:
        f.seek(offset)
        framed = f.read(length + 4)
    if len(framed) != length + 4:
        raise _damaged(path, offset - 12, "the file ends inside the record (truncated)")
    return check_record(path, offset, framed)


# ---------------------------------------------------------------------------------- tf.train.Example wire format
# Example{1: Features}; Features{1: repeated map entry {1: key string, 2: Feature}};
# Feature{oneof 1: BytesList{1: repeated bytes}, 2: FloatList{1: repeated float, packed}, 3: Int64List{1: repeated int64}}


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint is longer than 10 bytes")


def _fields(buf: bytes | memoryview) -> Iterable[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a message: an int for varints, a memoryview for length-delimited
    fields, the raw bytes for fixed-width ones."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        value: object
        if wire == 0:
            value, pos = _varint(view, pos)
        elif wire == 2:
            size, pos = _varint(view, pos)
            if pos + size > end:
                raise ValueError(f"field {field} says it holds {size} bytes, past the end of its message")
            value, pos = view[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError(f"field {field} is a {width}-byte value cut off by the end of its message")
            value, pos = view[pos:pos + width].tobytes(), pos + width
        else:
            raise ValueError(f"field {field} has wire type {wire}, which tf.train.Example does not use")
        yield field, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _feature(buf: memoryview) -> Feature:
    for kind, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            raise ValueError(f"a Feature's field {kind} is not a list (wire type other than length-delimited)")
        if kind == 1:
            return [v.tobytes() for f, _, v in _fields(value) if f == 1 and isinstance(v, memoryview)]
        if kind == 2:
            floats: list[float] = []
            for f, wire, v in _fields(value):
                if f == 1 and wire == 2 and isinstance(v, memoryview):  # packed
                    floats += np.frombuffer(v, dtype="<f4").tolist()
                elif f == 1 and wire == 5 and isinstance(v, bytes):
                    floats.append(struct.unpack("<f", v)[0])
            return floats
        if kind == 3:
            ints: list[int] = []
            for f, wire, v in _fields(value):
                if f == 1 and wire == 2 and isinstance(v, memoryview):  # packed
                    pos = 0
                    while pos < len(v):
                        raw, pos = _varint(v, pos)
                        ints.append(_signed(raw))
                elif f == 1 and wire == 0 and isinstance(v, int):
                    ints.append(_signed(v))
            return ints
    return []


def parse_example(data: bytes | memoryview) -> dict[str, Feature]:
    """The features of a serialized ``tf.train.Example``: name -> list of bytes, ints or floats. Raises a
    ``ValueError`` saying what is malformed."""
    out: dict[str, Feature] = {}
    for field, _, features in _fields(data):
        if field != 1 or not isinstance(features, memoryview):
            continue
        for entry_field, _, entry in _fields(features):
            if entry_field != 1 or not isinstance(entry, memoryview):
                continue
            name, value = None, memoryview(b"")
            for f, _, v in _fields(entry):
                if f == 1 and isinstance(v, memoryview):
                    name = v.tobytes().decode()
                elif f == 2 and isinstance(v, memoryview):
                    value = v
            if name is not None:
                out[name] = _feature(value)
    return out


def _put_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes, two's complement, as protobuf writes them
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _delimited(field: int, payload: bytes) -> bytes:
    return _put_varint(field << 3 | 2) + _put_varint(len(payload)) + payload


def encode_example(features: Mapping[str, Sequence[bytes] | Sequence[int] | Sequence[float]]) -> bytes:
    """A serialized ``tf.train.Example`` of ``features``: each a list of bytes (BytesList), ints (Int64List) or
    floats (FloatList), as TensorFlow writes them (packed numbers)."""
    entries = b""
    for name, given in features.items():
        values: list = list(given)
        if all(isinstance(v, bytes) for v in values) and values:
            feature = _delimited(1, b"".join(_delimited(1, v) for v in values))
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            feature = _delimited(3, _delimited(1, b"".join(_put_varint(int(v)) for v in values)))
        elif all(isinstance(v, (float, int)) for v in values):
            feature = _delimited(2, _delimited(1, np.asarray(values, dtype="<f4").tobytes()))
        else:
            raise TypeError(f"Feature {name!r} must be a list of bytes, of ints or of floats.")
        entries += _delimited(1, _delimited(1, name.encode()) + _delimited(2, feature))
    return _delimited(1, entries)
