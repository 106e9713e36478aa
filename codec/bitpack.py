"""Dense bit packing of b-bit integer codes, 1 <= b <= 8.

Stream format (normative)
-------------------------
The stream is a sequence of bits in which stream bit ``k`` is bit ``k % 8``
(0 = least significant) of byte ``k // 8``. Code ``i`` occupies stream bits
``[i*b, (i+1)*b)``, least significant bit first. Equivalently, every run of 8
consecutive codes forms ``b`` bytes: the little-endian bytes of the integer
``sum(code[j] << (j*b) for j in range(8))``. The unused high bits of the last
byte are zero, and ``n`` codes take exactly ``ceil(n*b/8)`` bytes.

Implementation
--------------
Everything is vectorized numpy; the only Python loops run over fixed-size
chunks (to bound scratch memory) and over the few merge levels. Packing merges
neighbouring fields pairwise: two clean ``w``-bit fields in the two halves of
a 16/32/64-bit lane become one ``2w``-bit field with three whole-array ops,
``x - (x >> half) * (2**half - 2**w)``; the lane dtype discards whatever
crosses a lane boundary, so no masks are needed. While a merged pair still
fits in a byte (b <= 4) it is narrowed to uint8 at once, halving the data
every later step touches (b=3 continues as 6-bit pairs, b=2 as 4-bit pairs).
Once a lane holds a whole number of bytes it is scattered to the stream as one
record per lane. Unpacking runs the same steps backwards. Codes >= 2**bits
are not masked: such input yields an unspecified stream.

Signed codes (``signed=True``) are int8 in [-2**(b-1), 2**(b-1)) and stored
offset by 2**(b-1); the offset (and the mask it needs) is applied block by
block while the block is in cache, as is its inverse when unpacking, so the
codec never makes a full-size offset copy of the codes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

__all__ = ["packed_size", "pack", "unpack", "pair_fields", "workspace"]

# Codes per chunk; scratch is 3.5 bytes per code of chunk. Each chunk costs
# ~25 numpy calls (~1 us each): at 2**18 codes, which would keep the scratch
# in a 1 MiB L2, that overhead costs more than the L3 traffic of 2**20 saves.
_CHUNK = 1 << 20
# Every chunk except the tail holds a multiple of this many codes, so every
# merge level works on whole lanes (8 codes of 5 or 7 bits fill a uint64).
_QUANTUM = 8
# Raw records have alignment 1, so numpy copies them at any byte offset with
# plain word moves (an unaligned uint32/uint64 copy takes a far slower path).
_V4, _V8 = np.dtype("V4"), np.dtype("V8")


@dataclass
class _Scratch:
    s: np.ndarray  # n bytes: the lanes being merged/split
    t: np.ndarray  # n bytes: temporaries of the same lane type
    p: np.ndarray  # n/2 bytes: pair bytes for b <= 4
    c: np.ndarray  # n bytes: offset (stored) codes of a signed block


def _scratch(n: int) -> _Scratch:
    # Allocated as uint64 so that uint16/32/64 views of it are aligned.
    def buf(nbytes: int) -> np.ndarray:
        return np.empty((nbytes + 7) // 8, np.uint64).view(np.uint8)[:nbytes]

    return _Scratch(buf(n), buf(n), buf(n // 2), buf(n))


def workspace(n: int) -> _Scratch:
    """Scratch for packing or unpacking up to ``n`` codes per call, for callers that pack
    many pieces (``workspace=`` of :func:`pack`/:func:`unpack`): 3.5 bytes per code, at most
    that of one internal chunk."""
    return _workspace(n, None)


def _workspace(n: int, given: _Scratch | None) -> _Scratch:
    need = max(_QUANTUM, min(n, _CHUNK))
    return given if given is not None and given.s.size >= need else _scratch(need)


def _check_bits(bits: int) -> int:
    bits = operator.index(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n*bits/8)``."""
    bits = _check_bits(bits)
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n * bits + 7) // 8


def _record_shape(bits: int) -> tuple[np.dtype, int]:
    """Lane record type after the merge levels, and how many of its bytes are used."""
    return (_V4, 3) if bits == 6 else (_V8, bits)


def _records(buf: np.ndarray, rec: np.dtype, count: int, stride: int) -> np.ndarray:
    """``count`` overlapping records of type ``rec`` starting every ``stride`` bytes of ``buf``."""
    return np.ndarray((count,), dtype=rec, buffer=buf, strides=(stride,))


def _merge(x: np.ndarray, t: np.ndarray, w: int, out: np.ndarray) -> None:
    """Lanes of ``x`` hold clean w-bit fields lo (bit 0) and hi (bit half);
    write ``lo | hi << w`` to ``out`` (may be ``x``). ``t`` is scratch."""
    half = x.dtype.itemsize * 4
    lane = x.dtype.type
    np.right_shift(x, lane(half), out=t)
    if lane is np.uint64:  # no 64-bit vector multiply before AVX-512: shift instead
        np.left_shift(t, lane(w), out=t)
        np.bitwise_and(x, lane((1 << half) - 1), out=out)
        np.bitwise_or(out, t, out=out)
        return
    np.multiply(t, lane((1 << half) - (1 << w)), out=t)
    np.subtract(x, t, out=out)


def _split(x: np.ndarray, t: np.ndarray, w: int, out: np.ndarray) -> None:
    """Inverse of :func:`_merge`: lanes of ``x`` hold a clean 2w-bit field;
    write lo at bit 0 and hi at bit half of each lane of ``out``."""
    half = x.dtype.itemsize * 4
    lane = x.dtype.type
    np.bitwise_and(x, lane(((1 << w) - 1) << w), out=t)
    np.multiply(t, lane((1 << (half - w)) - 1), out=t)
    np.add(x, t, out=out)


def _pack_block(src: np.ndarray, bits: int, dst: np.ndarray, ws: _Scratch) -> None:
    """Pack ``src`` (contiguous, ``src.size % 8 == 0``, 2 <= bits <= 7) into ``dst``."""
    m = src.size
    if bits <= 4:
        # Pair level in uint16 lanes (lo | hi << 8): lo < 2**(8-bits), so the
        # low byte of lane | lane >> (8-bits) is exactly lo | hi << bits and
        # narrowing to uint8 drops the junk in the high byte.
        x = src.view(np.uint16)
        t = ws.t[:m].view(np.uint16)
        np.right_shift(x, np.uint16(8 - bits), out=t)
        np.bitwise_or(t, x, out=t)
        pairs = dst if bits == 4 else ws.p[: m // 2]
        np.copyto(pairs, t, casting="unsafe")
        if bits < 4:
            _pack_block(pairs, 2 * bits, dst, ws)
    else:
        # 5..7 bits (or 6-bit pairs of 3-bit codes): merge until each lane holds
        # a whole number of bytes: 4 codes in 3 bytes of a uint32 for 6 bits,
        # 8 codes in `bits` bytes of a uint64 otherwise.
        s, t = ws.s[:m], ws.t[:m]
        _merge(src.view(np.uint16), t.view(np.uint16), bits, s.view(np.uint16))
        _merge(s.view(np.uint32), t.view(np.uint32), 2 * bits, s.view(np.uint32))
        if bits != 6:
            _merge(s.view(np.uint64), t.view(np.uint64), 4 * bits, s.view(np.uint64))
        rec, used = _record_shape(bits)
        # Scatter whole lanes as records every `used` bytes. Each record's zero
        # tail spills into the next record's slot and is overwritten by it:
        # this relies on numpy copying a 1-D array in ascending order (it
        # does; the tests would catch a change). Copying one record per lane
        # costs about as much as copying one byte per lane, so this is several
        # times cheaper than scattering byte columns. The last lane is exact.
        k = m // rec.itemsize
        if k > 1:
            np.copyto(_records(dst, rec, k - 1, used), s[: rec.itemsize * (k - 1)].view(rec))
        last = rec.itemsize * (k - 1)
        dst[(k - 1) * used :] = s[last : last + used]


def _unpack_block(src: np.ndarray, bits: int, dst: np.ndarray, ws: _Scratch) -> None:
    """Inverse of :func:`_pack_block` (1 <= bits <= 7): ``dst.size % 8 == 0`` codes."""
    m = dst.size
    if bits == 1:
        dst[...] = np.unpackbits(src, bitorder="little")
        return
    pairs = _pair_block(src, bits, m, ws)
    if bits <= 4:  # pair bytes: widen each to a uint16 lane, then move hi to bit 8
        y = dst.view(np.uint16)
        np.copyto(y, pairs)
        _split(y, ws.t[:m].view(np.uint16), bits, y)
    else:
        _split(pairs, ws.t[:m].view(np.uint16), bits, dst.view(np.uint16))


def _pair_block(src: np.ndarray, bits: int, m: int, ws: _Scratch) -> np.ndarray:
    """The m/2 pair fields ``code[2i] | code[2i+1] << bits`` of the m codes (m % 8 == 0,
    2 <= bits <= 7) packed in ``src``: uint8 for bits <= 4, else uint16, in ``src`` or
    the scratch; the last step of unpacking (one split) is all that is left."""
    if bits == 4:
        return src
    if bits < 4:
        pairs = ws.p[: m // 2]
        _unpack_block(src, 2 * bits, pairs, ws)
        return pairs
    s, t = ws.s[:m], ws.t[:m]
    rec, used = _record_shape(bits)
    k = m // rec.itemsize
    # Gather: overlapping reads of one record per lane; the bytes past
    # `used` belong to the next record, so this first split masks both
    # halves instead of relying on clean lanes like _split does.
    if k > 1:
        np.copyto(s[: rec.itemsize * (k - 1)].view(rec), _records(src, rec, k - 1, used))
    last = rec.itemsize * (k - 1)
    s[last:] = 0
    s[last : last + used] = src[(k - 1) * used :]
    lanes = s.view(np.uint32 if bits == 6 else np.uint64)
    half = lanes.dtype.itemsize * 4
    w = lanes.dtype.itemsize * bits // 2
    lane = lanes.dtype.type
    tl = t.view(lanes.dtype)
    np.left_shift(lanes, lane(half - w), out=tl)
    np.bitwise_and(tl, lane(((1 << w) - 1) << half), out=tl)
    np.bitwise_and(lanes, lane((1 << w) - 1), out=lanes)
    np.bitwise_or(lanes, tl, out=lanes)
    if bits != 6:
        _split(s.view(np.uint32), t.view(np.uint32), 2 * bits, s.view(np.uint32))
    return s.view(np.uint16)


def pair_fields(src: np.ndarray, bits: int, m: int, workspace: _Scratch) -> np.ndarray:
    """The ``m // 2`` fields ``code[2i] | code[2i+1] << bits`` (stored codes) of the first
    ``m`` codes packed in the uint8 array ``src``, for a table lookup of two codes at a
    time. ``m`` is a multiple of 8 and at most the ``workspace`` size, 2 <= bits <= 7;
    the result (uint8 for bits <= 4, else uint16) is valid until the workspace is used
    again."""
    bits = _check_bits(bits)
    if not 2 <= bits <= 7 or m % _QUANTUM or m > workspace.s.size:
        raise ValueError(f"pair fields need 2 <= bits <= 7 and a multiple of {_QUANTUM} "
                         f"codes within the workspace, got bits={bits}, m={m}")
    return _pair_block(src[: m * bits // 8], bits, m, workspace)


def _codes_u8(codes: object, signed: bool) -> np.ndarray:
    ok = (np.uint8, np.int8) if signed else (np.uint8,)
    if not isinstance(codes, np.ndarray) or codes.dtype.type not in ok:
        dtype = getattr(codes, "dtype", type(codes).__name__)
        want = "an int8 or uint8" if signed else "a uint8"
        raise TypeError(f"codes must be {want} numpy array, got {dtype}")
    return codes.view(np.uint8) if codes.ndim else codes.reshape(1).view(np.uint8)


def _stored(src: np.ndarray, bits: int, out: np.ndarray) -> np.ndarray:
    """Signed codes (two's complement bytes) offset by 2**(bits-1) into [0, 2**bits)."""
    np.add(src, np.uint8(1 << (bits - 1)), out=out)
    if bits < 8:
        np.bitwise_and(out, np.uint8((1 << bits) - 1), out=out)
    return out


def pack(codes: np.ndarray, bits: int, *, signed: bool = False, copy: bool = True,
         out: np.ndarray | None = None, workspace: _Scratch | None = None) -> np.ndarray:
    """Pack uint8 ``codes`` (any shape, flattened in C order) into a new 1-D
    uint8 stream of ``packed_size(codes.size, bits)`` bytes, or into ``out``
    (a writeable, contiguous 1-D uint8 array of exactly that size).

    Every code must be ``< 2**bits``; larger values are not masked. With
    ``signed``, ``codes`` are int8 (or their uint8 bytes) in
    ``[-2**(bits-1), 2**(bits-1))`` and the stream stores ``code + 2**(bits-1)``,
    computed block by block. ``copy=False`` lets 8-bit unsigned packing, which
    is the identity, return a (possibly read-only) view of ``codes``.
    """
    bits = _check_bits(bits)
    u = _codes_u8(codes, signed)
    if out is not None:
        _check_out(out, packed_size(u.size, bits))
    if bits == 8:
        if signed:  # + 128 modulo 256
            return np.bitwise_xor(u.reshape(-1), np.uint8(0x80), out=out)
        if out is not None:
            np.copyto(out, u.reshape(-1))
            return out
        return np.array(u, order="C").reshape(-1) if copy else np.ascontiguousarray(u).reshape(-1)
    # A view for C-contiguous input; other layouts pay one full copy.
    flat = np.ascontiguousarray(u).reshape(-1)
    n = flat.size
    if bits == 1:
        packed = np.packbits(_stored(flat, 1, np.empty_like(flat)) if signed else flat,
                             bitorder="little")
        if out is None:
            return packed
        np.copyto(out, packed)
        return out
    if out is None:
        out = np.empty(packed_size(n, bits), np.uint8)
    ws = _workspace(n, workspace)
    main = n - n % _QUANTUM
    aligned = flat.ctypes.data % 2 == 0
    for i in range(0, main, _CHUNK):
        m = min(_CHUNK, main - i)
        src = flat[i : i + m]
        if signed:  # offset while the block is in cache
            src = _stored(src, bits, ws.c[:m])
        elif not aligned:  # unaligned uint16 views would take numpy's slow path
            src = ws.c[:m]
            np.copyto(src, flat[i : i + m])
        _pack_block(src, bits, out[i * bits // 8 : (i + m) * bits // 8], ws)
    if main < n:
        # Tail: zero-pad to one quantum; zero codes make the padding bits zero.
        pad = np.zeros(_QUANTUM, np.uint8)
        pad[: n - main] = flat[main:]
        if signed:
            _stored(pad[: n - main], bits, pad[: n - main])
        block = np.empty(_QUANTUM * bits // 8, np.uint8)
        _pack_block(pad, bits, block, ws)
        out[main * bits // 8 :] = block[: out.size - main * bits // 8]
    return out


def _check_out(out: object, size: int) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
        raise TypeError("out must be a 1-D uint8 numpy array")
    if out.size != size or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable contiguous array of {size} bytes, "
                         f"got {out.size}")


def _as_bytes(buf: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise TypeError(f"buf array must be 1-D uint8, got {buf.ndim}-D {buf.dtype}")
        return np.ascontiguousarray(buf)
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return np.frombuffer(buf, dtype=np.uint8)
    raise TypeError(f"buf must be bytes-like or a uint8 array, got {type(buf).__name__}")


def unpack(
    buf: bytes | bytearray | memoryview | np.ndarray,
    bits: int,
    n: int,
    out: np.ndarray | None = None,
    *,
    signed: bool = False,
    workspace: _Scratch | None = None,
) -> np.ndarray:
    """Decode ``n`` codes of ``bits`` bits from ``buf`` (bytes-like or a 1-D
    uint8 array), which must be exactly ``packed_size(n, bits)`` bytes long.

    Returns a new 1-D uint8 array, or ``out`` (a writeable uint8 array of size
    ``n``, any shape) filled in C order. Padding bits in the last byte are
    ignored. With ``signed`` the stored values ``s`` become the int8 codes
    ``s - 2**(bits-1)`` (block by block), and ``out``, if given, is int8.
    """
    size = packed_size(n, bits)
    bits, n = int(bits), int(n)
    data = _as_bytes(buf)
    if data.size != size:
        raise ValueError(
            f"buffer holds {data.size} bytes; {n} codes of {bits} bits need exactly {size}"
        )
    want = np.int8 if signed else np.uint8
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != want:
            raise TypeError(f"out must be a {np.dtype(want).name} numpy array")
        if out.size != n:
            raise ValueError(f"out has {out.size} elements, expected {n}")
        # Decode straight into out unless that needs a staging copy.
        if out.flags.c_contiguous and not np.may_share_memory(out, data):
            _unpack_into(data, bits, out.reshape(-1).view(np.uint8), signed, workspace)
        else:
            np.copyto(out, _unpack_new(data, bits, n, signed).view(want).reshape(out.shape))
        return out
    res = _unpack_new(data, bits, n, signed)
    return res.view(np.int8) if signed else res


def _unpack_new(data: np.ndarray, bits: int, n: int, signed: bool) -> np.ndarray:
    if bits == 1 and not signed:
        return np.unpackbits(data, count=n, bitorder="little")
    res = np.empty(n, np.uint8)
    _unpack_into(data, bits, res, signed)
    return res


def _unpack_into(data: np.ndarray, bits: int, dst: np.ndarray, signed: bool,
                 workspace: _Scratch | None = None) -> None:
    """Codes into the contiguous uint8 ``dst``; signed: minus 2**(bits-1), wrapping."""
    n = dst.size
    half = np.uint8(1 << (bits - 1))
    if bits == 8:
        if signed:
            np.bitwise_xor(data, half, out=dst)  # - 128 modulo 256
        else:
            np.copyto(dst, data)
        return
    if bits == 1:
        dst[...] = np.unpackbits(data, count=n, bitorder="little")
        if signed:
            np.subtract(dst, half, out=dst)
        return
    ws = _workspace(n, workspace)
    main = n - n % _QUANTUM
    for i in range(0, main, _CHUNK):
        m = min(_CHUNK, main - i)
        block = dst[i : i + m]
        _unpack_block(data[i * bits // 8 : (i + m) * bits // 8], bits, block, ws)
        if signed:  # while the block is in cache
            np.subtract(block, half, out=block)
    if main < n:
        block = np.zeros(_QUANTUM * bits // 8, np.uint8)
        rest = data[main * bits // 8 :]
        block[: rest.size] = rest
        codes = np.empty(_QUANTUM, np.uint8)
        _unpack_block(block, bits, codes, ws)
        if signed:
            np.subtract(codes, half, out=codes)
        dst[main:] = codes[: n - main]
