"""The uniform quantizer every linear mapping ends in, with ONNX rounding.

Codes are ``saturate(rint(x / scale) + zero_point)``: divide in float32,
round half to even, *then* add the zero point (onnxruntime and PyTorch do
this; adding first changes the result on exact ties), then clamp in float so
±inf and huge values saturate instead of wrapping.
"""

from __future__ import annotations

import numpy as np

from .blocks import CHUNK, iter_blocks, pick


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, lo: int, hi: int,
             axis: int | None, out_dtype: np.dtype) -> np.ndarray:
    """Codes of C-contiguous float32 ``x``: clamp(lo, hi, rint(x/scale) + zero_point)."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    out = np.empty(x.shape, out_dtype)
    xf, of = x.reshape(-1), out.reshape(-1)
    buf = np.empty(min(x.size, CHUNK), np.float32)
    for start, stop, rows, cols, ch in iter_blocks(x.shape, axis if scale.ndim else None):
        t = buf[: stop - start].reshape(rows, cols)
        with np.errstate(over="ignore"):  # |x|/scale beyond FLT_MAX is inf: saturates below
            np.divide(xf[start:stop].reshape(rows, cols), pick(scale, ch), out=t)
        np.rint(t, out=t)
        z = pick(zp, ch)
        if ch is not None or z:
            t += z
        np.clip(t, lo, hi, out=t)
        of[start:stop].reshape(rows, cols)[...] = t
    return out


def dequantize(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               axis: int | None, out: np.ndarray | None = None) -> np.ndarray:
    """``(codes - zero_point) * scale`` in float32; the subtraction is exact in integers."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point).astype(np.int16)
    if out is None:
        out = np.empty(codes.shape, np.float32)
    cf, of = codes.reshape(-1), out.reshape(-1)
    buf = np.empty(min(codes.size, CHUNK), np.int16)
    for start, stop, rows, cols, ch in iter_blocks(codes.shape, axis if scale.ndim else None):
        t = buf[: stop - start].reshape(rows, cols)
        np.subtract(cf[start:stop].reshape(rows, cols), pick(zp, ch), out=t, dtype=np.int16)
        np.multiply(t, pick(scale, ch), out=of[start:stop].reshape(rows, cols),
                    dtype=np.float32)
    return out
