"""The featcodec bitstream: header, parameters, payload, CRC32 (docs/FORMAT.md).

Everything is little-endian. A reader checks every length against the buffer
and the element count against a limit *before* it allocates anything sized
by the stream, so a hostile header costs nothing but its own parse.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from math import prod

import numpy as np

from . import entropy, mappings, predict
from .errors import FormatError
from .varint import uleb128
from .mappings.base import Mapping, Params

MAGIC = b"FCQT"
VERSION = 1
FIXED = struct.Struct("<4sBBBBBBBB")  # magic version method flags coding dtype bits ndim axis
CRC_SIZE = 4
NO_AXIS = 0xFF
MAX_NDIM = 64
DEFAULT_MAX_ELEMENTS = 1 << 31

FLAG_SIGNED = 0x01
FLAG_RESTRICTED = 0x02
KNOWN_FLAGS = FLAG_SIGNED | FLAG_RESTRICTED

CODING_RAW = 0  # densely packed codes
# Other codings: (entropy coder << 4) | predictor, see codec/entropy.py and docs/FORMAT.md.

DTYPES = {1: np.dtype(np.float16), 2: np.dtype(np.float32), 3: np.dtype(np.float64)}
DTYPE_IDS = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Header:
    version: int
    mapping: Mapping
    flags: int
    coding: int
    dtype: np.dtype
    bits: int
    shape: tuple[int, ...]
    axis: int | None
    params: Params
    payload_offset: int
    payload_size: int

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAG_SIGNED)

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_size + CRC_SIZE

    @property
    def packed_size(self) -> int:
        """Size of the raw densely packed codes, ⌈n·b/8⌉ (the payload of a raw stream)."""
        return (self.size * self.bits + 7) // 8

    @property
    def entropy(self) -> str:
        return entropy.CODER_NAMES[entropy.split_coding(self.coding)[0]]

    @property
    def predictor(self) -> str:
        return predict.BY_ID[entropy.split_coding(self.coding)[1]]


def param_count(shape: tuple[int, ...], axis: int | None, per_channel: bool) -> int:
    return shape[axis] if per_channel and axis is not None else 1


def write_header(mapping: Mapping, flags: int, coding: int, dtype: np.dtype, bits: int,
                 shape: tuple[int, ...], axis: int | None, params: Params,
                 payload_size: int) -> bytes:
    parts = [
        FIXED.pack(MAGIC, VERSION, mapping.id, flags, coding, DTYPE_IDS[dtype], bits,
                   len(shape), NO_AXIS if axis is None else axis)
    ]
    parts.extend(uleb128(d) for d in shape)
    for p in mapping.params:
        n = param_count(shape, axis, p.per_channel)
        v = np.ascontiguousarray(np.broadcast_to(params[p.name], (n,)), dtype=p.dtype)
        parts.append(v.tobytes())
    parts.append(uleb128(payload_size))
    return b"".join(parts)


def seal(header: bytes, payload: np.ndarray | bytes) -> bytes:
    """header + payload + CRC32 of both, in one buffer."""
    body = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    crc = zlib.crc32(body, zlib.crc32(header))  # running CRC: no staging buffer to checksum
    return b"".join((header, body, crc.to_bytes(4, "little")))  # the payload's one copy


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise FormatError(f"truncated stream: {what} needs {n} bytes at offset {self.pos}, "
                              f"{len(self.buf) - self.pos} left")
        out = self.buf[self.pos: self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str) -> int:
        value = shift = 0
        start = self.pos
        for i in range(10):
            (byte,) = self.take(1, what)
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise FormatError(f"non-minimal varint for {what} at offset {start}")
                return value
        raise FormatError(f"varint for {what} at offset {start} is longer than 10 bytes")


def parse(blob: bytes | bytearray | memoryview, max_elements: int = DEFAULT_MAX_ELEMENTS,
          verify: bool = True) -> Header:
    """Parse and validate a stream's header; check lengths and CRC without decoding."""
    try:
        buf = memoryview(blob).cast("B")
    except TypeError:
        raise TypeError(f"a bitstream is bytes-like, not {type(blob).__name__}") from None
    r = _Reader(buf)
    magic, version, method, flags, coding, dtype_id, bits, ndim, axis_b = FIXED.unpack(
        r.take(FIXED.size, "fixed header"))
    if magic != MAGIC:
        raise FormatError(f"not a featcodec stream (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"unsupported stream version {version} (this library reads {VERSION})")
    mapping = mappings.by_id(method)
    if mapping is None:
        raise FormatError(f"unknown method id {method}")
    if flags & ~KNOWN_FLAGS:
        raise FormatError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    if coding != CODING_RAW:
        entropy.check_coding(coding, ndim)
    if dtype_id not in DTYPES:
        raise FormatError(f"unknown dtype id {dtype_id}")
    signed = bool(flags & FLAG_SIGNED)
    lo, hi = mapping.bit_range(signed)
    if not lo <= bits <= hi:
        raise FormatError(f"{mapping.name}: bits {bits} outside [{lo}, {hi}]")
    if ndim > MAX_NDIM:
        raise FormatError(f"ndim {ndim} exceeds {MAX_NDIM}")
    if axis_b != NO_AXIS and axis_b >= ndim:
        raise FormatError(f"axis {axis_b} out of range for ndim {ndim}")
    axis = None if axis_b == NO_AXIS else axis_b
    shape = tuple(r.varint("shape") for _ in range(ndim))
    n = nonzero = 1
    for d in shape:  # check as we multiply: a hostile shape must not build a huge int
        n *= d
        nonzero *= max(d, 1)
        if n > max_elements or d > max_elements:
            raise FormatError(f"shape {shape} has more than {max_elements} elements")
        if nonzero > max_elements:  # numpy cannot make even an empty array of that shape
            raise FormatError(f"shape {shape}: its non-zero dimensions multiply to more "
                              f"than {max_elements}")
    params: Params = {}
    for p in mapping.params:
        count = param_count(shape, axis, p.per_channel)
        dt = np.dtype(p.dtype)
        raw = r.take(count * dt.itemsize, f"parameter {p.name}")
        v = np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="))
        params[p.name] = v if p.per_channel and axis is not None else v.reshape(())
    payload_size = r.varint("payload length")
    expected = (n * bits + 7) // 8
    if coding == CODING_RAW and payload_size != expected:
        raise FormatError(f"payload length {payload_size} does not match {n} elements "
                          f"at {bits} bits ({expected} bytes)")
    if coding != CODING_RAW and payload_size >= expected:
        # An encoder writes a coded payload only when it is smaller than the packed codes.
        raise FormatError(f"coded payload length {payload_size} is not below the "
                          f"{expected} bytes of the packed codes (coding 0x{coding:02x})")
    offset = r.pos
    total = offset + payload_size + CRC_SIZE
    if len(buf) < total:
        raise FormatError(f"truncated stream: {len(buf)} bytes, header declares {total}")
    if len(buf) > total:
        raise FormatError(f"{len(buf) - total} trailing bytes after the stream")
    if verify:
        stored = int.from_bytes(buf[total - CRC_SIZE: total], "little")
        if zlib.crc32(buf[: total - CRC_SIZE]) != stored:
            raise FormatError("CRC32 mismatch: the stream is corrupted")
    try:
        mapping.check(params, bits, signed)
    except ValueError as exc:
        raise FormatError(f"invalid parameters: {exc}") from None
    return Header(version, mapping, flags, coding, DTYPES[dtype_id], bits, shape, axis,
                  params, offset, payload_size)
