"""Raw streams encoded and decoded one segment at a time.

A raw stream's payload is the packed codes, so encode quantizes a segment
of the tensor into a cache-sized scratch, packs it straight into the
returned bytes and runs the CRC over them while they are in cache; decode
(after checking the CRC) unpacks a segment into scratch and dequantizes it
into the output, or, for codes below 8 bits, gathers the values of each byte
(per tensor also of each code pair) from a table (:class:`_FieldTable`). No
full-size codes array is made: 8-bit codes go straight into, or come straight out of, the stream.

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
from .mappings.blocks import iter_blocks, pick
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
        xs = xf[seg.start:seg.stop].reshape(seg.shape)
        axis0, seg_params = None if seg.rows is None else 0, _slice(params, seg)
        seg_range = x_range if seg.rows is None else None
        if scratch is None:  # 8 bits: the stored bytes themselves
            mapping.quantize_stored(xs, axis0, signed, seg_params, restricted,
                                    dst.reshape(seg.shape), seg_range)
        else:
            codes = scratch[:m]
            mapping.quantize(xs, bits, axis0, signed, seg_params, restricted,
                             out=codes.reshape(seg.shape), x_range=seg_range)
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
    runs = (shape[axis], prod(shape[axis + 1:])) if per_channel and axis is not None else None
    table = _FieldTable(mapping, bits, signed, params, n, runs) \
        if _FieldTable.usable(mapping, bits, n, runs) else None
    codes_buf = np.empty(longest, code_type) if (bits < 8 or signed) and not table else None
    ws = bitpack.workspace(longest) if bits < 8 and not table else None
    f32_buf = np.empty(longest, np.float32) if dtype != np.float32 else None
    for seg in segs:
        m = seg.stop - seg.start
        src = payload[_bytes(seg, bits)]
        dst = of[seg.start:seg.stop] if f32_buf is None else f32_buf[:m]
        axis0, seg_params = None if seg.rows is None else 0, _slice(params, seg)
        if table is not None:
            table.decode(src, dst, seg.rows)
        elif bits == 8:  # the stored bytes themselves
            scratch = None if codes_buf is None else codes_buf[:m].view(np.uint8)
            mapping.dequantize_stored(src.reshape(seg.shape), axis0, signed, seg_params,
                                      dst.reshape(seg.shape), scratch)
        else:
            codes = bitpack.unpack(src, bits, m, out=codes_buf[:m], signed=signed,
                                   workspace=ws)
            mapping.dequantize(codes.reshape(seg.shape), bits, axis0, signed, seg_params,
                               out=dst.reshape(seg.shape))
        if f32_buf is not None:
            np.copyto(of[seg.start:seg.stop], dst, casting="unsafe")
    return out


class _FieldTable:
    """Decoded values of every field of a stream: a byte of 1, 2 or 4-bit codes, or
    (per tensor) a pair of 3, 5, 6 or 7-bit codes (``code[2i] | code[2i+1] << bits``,
    which unpacking yields one step before the codes themselves); one table per channel
    for a per-channel stream.

    One gather from a table of k float32 values per field replaces unpacking and
    dequantizing k codes: about 20 % faster for linear codes at 3 and 4 bits, and
    1.6-1.8x for the companders, whose levels are a table lookup anyway (2.3-2.5x per
    channel, where each code was looked up in its channel's levels). The table's
    values are the mapping's own dequantize of every code, so the result is the same
    floats.
    """

    _BLOCK = 1 << 17  # fields per gather: 1 MiB of intp indices
    # A pair table has 2**(2*bits) entries (128 KiB at 7 bits) and costs ~100 µs to
    # build. A compander's table pays for itself at ~16 codes per entry; a linear
    # dequantize is cheap arithmetic, so its table pays only on tensors of about a
    # segment (measured: 3-6 % slower at 256 Ki codes, 5-10 % faster at 1 Mi).
    PAIR_MIN_CODES_PER_ENTRY = 16
    PAIR_MIN_CODES_LINEAR = 1 << 20
    # Per-channel tables (256 fields each) take at most 1/this of the output's bytes.
    CHANNEL_TABLES_SHARE = 4

    def __init__(self, mapping: Mapping, bits: int, signed: bool, params: Params,
                 n: int, runs: tuple[int, int] | None = None) -> None:
        n_codes = 1 << bits
        stored = np.arange(n_codes)
        codes = (stored - n_codes // 2).astype(np.int8) if signed else stored.astype(np.uint8)
        channels = 1 if runs is None else runs[0]
        self.levels = mapping.dequantize(np.tile(codes, (channels, 1)), bits,  # by channel
                                         None if runs is None else 0, signed, params)
        self.bits = bits
        self.k = 8 // bits if 8 % bits == 0 else 2
        # Field f = sum(code_j << j*bits) (LSB first) indexes a C-order array whose
        # axis k-1-j runs over code_j: entry j of each record broadcasts levels along it.
        table = np.empty((channels,) + (n_codes,) * self.k + (self.k,), np.float32)
        for j in range(self.k):
            table[..., j] = self.levels.reshape(
                [channels] + [n_codes if a == self.k - 1 - j else 1 for a in range(self.k)])
        self.entries = n_codes ** self.k  # per channel
        self.record = np.dtype((np.void, 4 * self.k))
        self.table = table.view(self.record).reshape(-1)
        self.idx = np.empty(min(self._BLOCK, n), np.intp)
        self.ws = None if 8 % bits == 0 else bitpack.workspace(min(SEGMENT, n))

    @classmethod
    def usable(cls, mapping: Mapping, bits: int, n: int,
               runs: tuple[int, int] | None = None) -> bool:
        """Whether a table pays for ``n`` codes of ``bits``; ``runs`` is (channels, codes
        per run of one channel) of a per-channel stream, which takes byte fields whole in
        every run, from tables (256·k float32 a channel) at most a quarter of the output."""
        if not n or bits == 8:
            return False
        if runs is not None:
            k = 8 // bits if 8 % bits == 0 else 0
            return k > 0 and runs[1] % k == 0 and \
                runs[0] * 256 * k * cls.CHANNEL_TABLES_SHARE <= n
        if 8 % bits == 0:
            return True
        return n >= max(cls.PAIR_MIN_CODES_PER_ENTRY << (2 * bits),
                        cls.PAIR_MIN_CODES_LINEAR if mapping.linear else 0)

    def decode(self, src: np.ndarray, dst: np.ndarray, rows: np.ndarray | None = None
               ) -> None:
        """The ``dst.size`` values packed in the bytes ``src`` into float32 ``dst``; for
        a per-channel stream, ``rows`` is the channel of each of the segment's runs."""
        m = dst.size
        if rows is not None:  # whole runs of whole bytes: fields + channel · entries
            offsets = rows.astype(np.intp) * self.entries
            records = dst.view(self.record)
            for start, stop, r, c, ch in iter_blocks((rows.size, m // rows.size // self.k),
                                                     0, self.idx.size):
                idx = self.idx[: stop - start].reshape(r, c)
                np.add(src[start:stop].reshape(r, c), pick(offsets, ch), out=idx)
                np.take(self.table, idx, out=records[start:stop].reshape(r, c), mode="clip")
            return
        if self.ws is None:  # fields are the bytes themselves
            whole = m // self.k  # bytes all of whose codes are wanted
            self._gather(src[:whole], dst[: whole * self.k].view(self.record))
        else:
            whole = m // 8 * 8 // 2  # pairs in whole quanta of 8 codes
            step = self.ws.s.size // 8 * 8  # pair_fields takes whole quanta of 8 codes
            for c0 in range(0, 2 * whole, step):
                c1 = min(c0 + step, 2 * whole)
                fields = bitpack.pair_fields(src[c0 * self.bits // 8:], self.bits, c1 - c0,
                                             self.ws)
                self._gather(fields, dst[c0:c1].view(self.record))
        done = whole * self.k
        if done == m:
            return
        if self.ws is None:  # a last byte with padding codes
            byte = int(src[whole])
            dst[done:] = self.table[byte: byte + 1].view(np.float32)[: m - done]
        else:  # fewer than 8 codes
            dst[done:] = self.levels[0, bitpack.unpack(src[done * self.bits // 8:], self.bits,
                                                       m - done)]

    def _gather(self, fields: np.ndarray, records: np.ndarray) -> None:
        for start in range(0, fields.size, self.idx.size):
            stop = min(start + self.idx.size, fields.size)
            idx = self.idx[: stop - start]
            np.copyto(idx, fields[start:stop])
            np.take(self.table, idx, out=records[start:stop], mode="clip")  # in range
