"""The uniform quantizer every linear mapping ends in, with ONNX rounding, and
:class:`UniformMapping`, the base of those mappings.

Codes are ``saturate(rint(x / scale) + zero_point)``: divide in float32,
round half to even, *then* add the zero point (onnxruntime and PyTorch do
this; adding first changes the result on exact ties), then clamp in float so
±inf and huge values saturate instead of wrapping.

Kernel (per cache-sized block, four numpy calls):

1. ``t = x / scale`` (the only pass that reads memory);
2. ``t = clip(t, lo - z, hi - z)``: the bounds are integers, so clamping
   before rounding is the same as clamping after it, and |t| <= 2**8;
3. ``t += M`` with ``M = 1.5 * 2**23 (+ z)``: in [2**23, 2**24) a float32
   step is 1, so the addition itself rounds t half to even (M is even), and
   the bit pattern of ``M + k`` is ``bits(M) + k``; ``bits(1.5 * 2**23)``
   ends in a zero byte, so the low byte of the pattern is ``(z + k) mod 256``;
4. an int32 → uint8/int8 cast keeps that low byte: the code.

When z is odd the rounding needs an even M, so z is added to the codes in
their own (wrapping) 8-bit type afterwards instead. Identical codes to the
reference expression ``clip(rint(x / s) + z, lo, hi)`` on every input
(tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np

from .base import Mapping, Params
from .blocks import CHUNK, iter_blocks, pick

# Elements per block of the per-tensor loops: numpy's ~1-3 µs per call matter more
# there than L2 residency (an L3-resident 512 KiB block was measured faster than 256 KiB).
HOT_CHUNK = 1 << 17

_MAGIC = 1.5 * 2**23  # bits 0x4B400000
# The clip ufunc itself: np.clip's Python wrapper costs a few µs per block.
_clip = getattr(getattr(np, "_core", None), "umath", None)
_clip = getattr(_clip, "clip", np.clip)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, lo: int, hi: int,
             axis: int | None, out_dtype: np.dtype, out: np.ndarray | None = None,
             x_range: tuple[float, float] | None = None) -> np.ndarray:
    """Codes of C-contiguous float32 ``x``: clamp(lo, hi, rint(x/scale) + zero_point),
    into ``out`` (C-contiguous, ``out_dtype``) when given.

    ``lo``/``hi`` lie in the range of ``out_dtype`` (uint8 or int8), and so do the zero points.
    ``x_range``, the (min, max) of ``x`` if known, lets a per-tensor call skip the clamp when
    it cannot change a code (see :func:`_clamp_needed`).
    """
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point).astype(np.int64)
    out_dtype = np.dtype(out_dtype)
    if out is None:
        out = np.empty(x.shape, out_dtype)
    if x.size == 0:
        return out
    xf, of = x.reshape(-1), out.reshape(-1)
    per_channel = scale.ndim > 0 and axis is not None
    buf = np.empty(min(x.size, CHUNK if per_channel else HOT_CHUNK), np.float32)
    if not per_channel:
        scale, zp = scale.reshape(-1)[0], zp.reshape(-1)
    odd = bool(np.any(zp % 2))  # z then goes in after the cast, in the 8-bit type
    # Per block: the step, the float clamp bounds, the rounding constant, and z or None.
    bounds_lo = (lo - zp).astype(np.float32)
    bounds_hi = (hi - zp).astype(np.float32)
    magic = np.float32(_MAGIC) + (np.zeros_like(zp) if odd else zp).astype(np.float32)
    late = zp.astype(out_dtype) if odd else None  # values fit out_dtype (checked ranges)
    if not per_channel:
        bounds_lo, bounds_hi, magic = bounds_lo[0], bounds_hi[0], magic[0]
        late = None if late is None else late[0]
    # A per-channel clamp is always run: only the per-tensor range is known here.
    clamp = per_channel or _clamp_needed(x_range, scale, bounds_lo, bounds_hi)
    with np.errstate(over="ignore"):  # |x|/scale beyond FLT_MAX is inf: clamped below
        for start, stop, rows, cols, ch in iter_blocks(x.shape, axis if per_channel else None,
                                                       buf.size):
            t = buf[: stop - start].reshape(rows, cols)
            o = of[start:stop].reshape(rows, cols)
            if ch is None:
                s, b0, b1, m, z = scale, bounds_lo, bounds_hi, magic, late
            else:
                s, b0, b1, m = (pick(v, ch) for v in (scale, bounds_lo, bounds_hi, magic))
                z = None if late is None else pick(late, ch)
            np.divide(xf[start:stop].reshape(rows, cols), s, out=t)
            if clamp:
                _clip(t, b0, b1, out=t)
            np.add(t, m, out=t)
            np.copyto(o, t.view(np.int32), casting="unsafe")  # the low byte
            if z is not None:
                np.add(o, z, out=o)  # wraps modulo 256 like the low byte above
    return out


def _clamp_needed(x_range: tuple[float, float] | None, scale: np.float32,
                  bounds_lo: np.float32, bounds_hi: np.float32) -> bool:
    """Whether clamping x/scale to [bounds_lo, bounds_hi] can change anything.

    Correctly rounded division by a positive scale is monotone, so when the
    quotients of the smallest and the largest element lie inside the bounds,
    every quotient does and the clamp is the identity (exactly, not nearly).
    """
    if x_range is None:
        return True
    with np.errstate(all="ignore"):
        ends = np.array(x_range, np.float32) / scale  # the kernel's own float32 division
    return not (bounds_lo <= ends[0] and ends[1] <= bounds_hi)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               axis: int | None, out: np.ndarray | None = None) -> np.ndarray:
    """``(codes - zero_point) * scale`` in float32.

    The codes widen to float32 exactly and ``codes - zero_point`` is a small
    integer, exact in float32 too, so the one rounding is the product's, as in
    the integer-subtract-then-multiply reference.
    """
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    if out is None:
        out = np.empty(codes.shape, np.float32)
    if codes.size == 0:
        return out
    cf, of = codes.reshape(-1), out.reshape(-1)
    per_channel = scale.ndim > 0 and axis is not None
    if not per_channel:
        scale, zp = scale.reshape(-1)[0], zp.reshape(-1)[0]
    any_zp = bool(np.any(zp))
    for start, stop, rows, cols, ch in iter_blocks(codes.shape, axis if per_channel else None,
                                                   None if per_channel else HOT_CHUNK):
        o = of[start:stop].reshape(rows, cols)
        np.copyto(o, cf[start:stop].reshape(rows, cols))
        if ch is None:
            s, z = scale, zp
        else:
            s, z = pick(scale, ch), pick(zp, ch)
        if any_zp:
            np.subtract(o, z, out=o)
        np.multiply(o, s, out=o)
    return out


class UniformMapping(Mapping):
    """A mapping whose codes are ``clamp(lo, hi, rint(x / scale) + z)``: the kernels above
    do all its quantizing; a subclass says where its grid lies (:meth:`grid`)."""

    def grid(self, params: Params, bits: int, signed: bool, restricted: bool
             ) -> tuple[np.ndarray, int, int]:
        """(zero point, lowest code, highest code)."""
        raise NotImplementedError

    def quantize(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                 params: Params, restricted: bool = False, out: np.ndarray | None = None,
                 x_range: tuple[float, float] | None = None) -> np.ndarray:
        z, lo, hi = self.grid(params, bits, signed, restricted)
        return quantize(x, params["scale"], z, lo, hi, axis,
                        np.dtype(np.int8 if signed else np.uint8), out, x_range)

    def dequantize(self, codes: np.ndarray, bits: int, axis: int | None, signed: bool,
                   params: Params, out: np.ndarray | None = None) -> np.ndarray:
        z = self.grid(params, bits, signed, False)[0]
        return dequantize(codes, params["scale"], z, axis, out)

    # The stream stores a signed 8-bit code + 128: folded into z, that offset costs no
    # pass of its own (and is exact: an integer, in either direction).
    def quantize_stored(self, x: np.ndarray, axis: int | None, signed: bool, params: Params,
                        restricted: bool, out: np.ndarray,
                        x_range: tuple[float, float] | None = None) -> None:
        z, lo, hi = self.grid(params, 8, signed, restricted)
        off = 128 if signed else 0
        quantize(x, params["scale"], np.asarray(z).astype(np.int16) + off, lo + off, hi + off,
                 axis, np.dtype(np.uint8), out, x_range)

    def dequantize_stored(self, stored: np.ndarray, axis: int | None, signed: bool,
                          params: Params, out: np.ndarray, scratch: np.ndarray | None) -> None:
        z = np.asarray(self.grid(params, 8, signed, False)[0]).astype(np.int16)
        dequantize(stored, params["scale"], z + (128 if signed else 0), axis, out)
