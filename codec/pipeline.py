"""Raw streams encoded and decoded one segment at a time.

A raw stream's payload is the packed codes, so encode quantizes a segment
of the tensor into a cache-sized scratch, packs it straight into the
returned bytes and runs the CRC over them while they are in cache; decode
(after checking the CRC) unpacks a segment into scratch and dequantizes it
into the output. No full-size codes array is made: 8-bit codes go straight
into, or come straight out of, the stream.

Segments start at multiples of 8 codes, so every segment but the last
packs to whole bytes. A per-channel segment is a run of whole rows (a row
is the elements of one channel that are contiguous in memory); the mapping
sees it as a (rows, cols) tensor with axis 0 and the rows' own parameters,
which gives the codes it would give for the whole tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from math import gcd, prod

import numpy as np

from . import bitpack
from .mappings.base import Mapping, Params
from .outbytes import OutBytes

# Codes per segment: 1 MiB of code scratch and 4 MiB of float32, a few hundred
# thousand numpy calls' worth of data, so the per-segment calls cost ~1 %.
SEGMENT = 1 << 20


@dataclass(frozen=True)
class Segment:
    start: int  # first element, flat C order
    stop: int
    shape: tuple[int, ...]  # the segment as the mapping sees it
    rows: np.ndarray | None  # channel of each row (axis 0), or None: per-tensor


def segments(shape: tuple[int, ...], axis: int | None, per_channel: bool,
             size: int | None = None) -> Iterator[Segment]:
    """The segments of a tensor, about ``size`` (default :data:`SEGMENT`) elements each."""
    size = SEGMENT if size is None else size
    n = prod(shape)
    if n == 0:
        return
    if not per_channel or axis is None:
        for s in range(0, n, size):
            e = min(s + size, n)
            yield Segment(s, e, (e - s,), None)
        return
    c, post = shape[axis], prod(shape[axis + 1:])
    nrows = n // post
    if post % 8 == 0 and post > size:  # long rows: pieces of one row
        for r in range(nrows):
            ch = np.array([r % c])
            for s in range(0, post, size):
                e = min(s + size, post)
                yield Segment(r * post + s, r * post + e, (1, e - s), ch)
        return
    unit = 8 // gcd(post, 8)  # rows per whole number of bytes at any bit width
    k = max(unit, size // post // unit * unit)
    for r0 in range(0, nrows, k):
        r1 = min(r0 + k, nrows)
        yield Segment(r0 * post, r1 * post, (r1 - r0, post), np.arange(r0, r1) % c)


def _per_channel(params: Params, axis: int | None) -> bool:
    return axis is not None and any(np.ndim(v) for v in params.values())


def _slice(params: Params, seg: Segment) -> Params:
    if seg.rows is None:
        return params
    return {k: (v if np.ndim(v) == 0 else np.asarray(v)[seg.rows]) for k, v in params.items()}


def _bytes(seg: Segment, bits: int) -> slice:
    return slice(seg.start * bits // 8, (seg.stop * bits + 7) // 8)


def encode_raw(mapping: Mapping, x: np.ndarray, bits: int, axis: int | None, signed: bool,
               params: Params, restricted: bool, header: bytes,
               x_range: tuple[float, float] | None = None) -> bytes:
    """header + packed codes of C-contiguous float32 ``x`` + CRC32, segment by segment.
    ``x_range`` is the (min, max) of ``x`` if known (it bounds every segment too)."""
    size = bitpack.packed_size(x.size, bits)
    result = OutBytes(len(header) + size + 4)
    result.array[:len(header)] = np.frombuffer(header, np.uint8)
    payload = result.array[len(header):len(header) + size]
    code_type = np.int8 if signed else np.uint8
    segs = list(segments(x.shape, axis, _per_channel(params, axis)))
    scratch = ws = None
    if bits < 8 and segs:
        scratch = np.empty(max(s.stop - s.start for s in segs), code_type)
        ws = bitpack.workspace(scratch.size)
    xf = x.reshape(-1)
    crc = zlib.crc32(header)
    for seg in segs:
        m = seg.stop - seg.start
        dst = payload[_bytes(seg, bits)]
        codes = dst.view(code_type) if scratch is None else scratch[:m]
        mapping.quantize(xf[seg.start:seg.stop].reshape(seg.shape), bits,
                         None if seg.rows is None else 0, signed, _slice(params, seg),
                         restricted, out=codes.reshape(seg.shape),
                         x_range=x_range if seg.rows is None else None)
        if scratch is None:
            if signed:  # stored code + 128, i.e. the top bit flipped, in place
                np.bitwise_xor(dst, np.uint8(0x80), out=dst)
        else:
            bitpack.pack(codes, bits, signed=signed, out=dst, workspace=ws)
        crc = zlib.crc32(dst, crc)
    result.array[-4:] = np.frombuffer(crc.to_bytes(4, "little"), np.uint8)
    return result.finish()


def decode_raw(mapping: Mapping, blob: memoryview, payload_offset: int, bits: int,
               shape: tuple[int, ...], axis: int | None, signed: bool, params: Params,
               dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """The decoded tensor of a verified raw stream (header parsed, CRC checked), in ``out``
    (C-contiguous, ``shape`` and ``dtype``) when given.

    The CRC is checked before, not while, decoding: it runs at ~3 GB/s, far below
    memory speed, so a separate pass costs next to nothing more, and a corrupted
    stream is refused before anything sized by its header is allocated."""
    n = prod(shape)
    if out is None:
        out = np.empty(shape, dtype)
    of = out.reshape(-1)
    payload = np.frombuffer(blob, np.uint8, bitpack.packed_size(n, bits), payload_offset)
    per_channel = _per_channel(params, axis)
    segs = list(segments(shape, axis, per_channel))
    longest = max((s.stop - s.start for s in segs), default=0)
    code_type = np.int8 if signed else np.uint8
    table = None
    if 8 % bits == 0 and bits < 8 and not per_channel and n:
        table = _ByteTable(mapping, bits, signed, params, payload.size)
    codes_buf = np.empty(longest, code_type) if (bits < 8 or signed) and not table else None
    ws = bitpack.workspace(longest) if bits < 8 and not table else None
    f32_buf = np.empty(longest, np.float32) if dtype != np.float32 else None
    for seg in segs:
        m = seg.stop - seg.start
        src = payload[_bytes(seg, bits)]
        if table is not None:
            dst = of[seg.start:seg.stop] if f32_buf is None else f32_buf[:m]
            table.decode(src, dst)
        elif codes_buf is None:
            codes = src
        else:
            codes = bitpack.unpack(src, bits, m, out=codes_buf[:m], signed=signed,
                                   workspace=ws)
        if table is None:
            dst = of[seg.start:seg.stop] if f32_buf is None else f32_buf[:m]
            mapping.dequantize(codes.reshape(seg.shape), bits,
                               None if seg.rows is None else 0, signed, _slice(params, seg),
                               out=dst.reshape(seg.shape))
        if f32_buf is not None:
            np.copyto(of[seg.start:seg.stop], dst, casting="unsafe")
    return out


class _ByteTable:
    """Decoded values of every byte of a per-tensor stream of 1, 2 or 4-bit codes.

    A byte holds k = 8/bits codes, so one gather from a 256-entry table of k float32
    values replaces unpacking and dequantizing them (about 20 % faster at 4 bits).
    The table's values are the mapping's own dequantize of every code, so the
    result is the same floats.
    """

    _BLOCK = 1 << 17  # bytes per gather: 1 MiB of intp indices

    def __init__(self, mapping: Mapping, bits: int, signed: bool, params: Params,
                 nbytes: int) -> None:
        n_codes = 1 << bits
        stored = np.arange(n_codes)
        codes = (stored - n_codes // 2).astype(np.int8) if signed else stored.astype(np.uint8)
        levels = mapping.dequantize(codes, bits, None, signed, params)  # by stored value
        self.k = 8 // bits
        byte = np.arange(256)
        table = np.stack([levels[(byte >> (j * bits)) & (n_codes - 1)]  # LSB-first codes
                          for j in range(self.k)], axis=1).astype(np.float32)
        self.record = np.dtype((np.void, 4 * self.k))
        self.table = np.ascontiguousarray(table).view(self.record).reshape(256)
        self.idx = np.empty(min(self._BLOCK, nbytes), np.intp)

    def decode(self, src: np.ndarray, dst: np.ndarray) -> None:
        """The ``dst.size`` values packed in the bytes ``src`` into float32 ``dst``."""
        whole = dst.size // self.k  # bytes all of whose codes are wanted
        records = dst[: whole * self.k].view(self.record)
        for start in range(0, whole, self.idx.size):
            stop = min(start + self.idx.size, whole)
            idx = self.idx[: stop - start]
            np.copyto(idx, src[start:stop])
            np.take(self.table, idx, out=records[start:stop], mode="clip")  # in range
        if whole < src.size:  # a last byte with padding codes
            byte = int(src[whole])
            last = self.table[byte: byte + 1].view(np.float32)
            dst[whole * self.k:] = last[: dst.size - whole * self.k]
