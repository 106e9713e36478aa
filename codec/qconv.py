"""Integer-exact 2-D convolution of quantized tensors (numpy only).

``qconv2d`` computes the ONNX QLinearConv / ConvInteger accumulator
``acc = sum (x_Q - z_x)(w_Q - z_w)`` exactly and either scales it to float32
or requantizes it bit-exactly like onnxruntime's QLinearConv. The product runs
on BLAS in float32 (or float64) on an im2col matrix; the bounds that make that
exact are checked per call, see docs/QCONV.md.
"""

from __future__ import annotations

import math
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .qtensor import QTensor

__all__ = ["ConvGeometry", "accumulate", "conv_geometry", "qconv2d"]

LINEAR_METHODS = ("linear", "symmetric")
F32_EXACT = 2**24  # every integer of magnitude <= 2**24 is a float32
F64_EXACT = 2**52  # headroom below 2**53 for adding bias and offsets
MIN_F32_CHUNK = 64  # narrower K chunks make several sgemms slower than one dgemm (measured)
PREP_CACHE_BYTES = 256 * 2**20  # prepared float32 weights kept for reuse

CODE_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}

Path = Literal["f32", "f64", "i64"]


@dataclass(frozen=True)
class ConvGeometry:
    """Validated convolution attributes; padding is (top, left, bottom, right)."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    kernel: tuple[int, int]
    out_hw: tuple[int, int]


def _int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(v).__name__}") from None


def _ints(v: Any, name: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = tuple(_int(e, name) for e in np.asarray(v, dtype=object).ravel())
        if len(vals) not in sizes or np.ndim(v) != 1:
            counts = " or ".join(map(str, sizes))
            raise ValueError(f"{name} must be an int or a sequence of {counts} integers, "
                             f"got {v!r}")
        return vals
    return (_int(v, name),)


def conv_geometry(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: Any = 1,
                  padding: Any = 0, dilation: Any = 1, groups: Any = 1) -> ConvGeometry:
    """Check NCHW/OIHW shapes and attributes; compute the output size."""
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D NCHW, got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"w must be 4-D OIHW, got shape {tuple(w_shape)}")
    s = _ints(stride, "stride", (1, 2))
    d = _ints(dilation, "dilation", (1, 2))
    p = _ints(padding, "padding", (1, 2, 4))
    g = _int(groups, "groups")
    sh, sw = s * (3 - len(s))
    dh, dw = d * (3 - len(d))
    top, left, bottom, right = p * 4 if len(p) == 1 else (p * 2 if len(p) == 2 else p)
    pad = (top, left, bottom, right)
    if min(sh, sw) < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    if min(dh, dw) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    if min(pad) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    if g < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    if min(n, c, h, w) < 1 or min(o, cg, kh, kw) < 1:
        raise ValueError(f"empty tensor: x {tuple(x_shape)}, w {tuple(w_shape)}")
    if c % g or o % g:
        raise ValueError(f"channels (in {c}, out {o}) must be divisible by groups={g}")
    if cg * g != c:
        raise ValueError(f"w has {cg} input channels per group but x has {c} channels "
                         f"and groups={g} (expected {c // g})")
    oh = (h + pad[0] + pad[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pad[1] + pad[3] - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the dilated {kh}x{kw} kernel does not fit the padded {h}x{w} input")
    return ConvGeometry((sh, sw), pad, (dh, dw), g, (kh, kw), (oh, ow))


def _zero_point(t: QTensor, name: str) -> np.ndarray:
    if t.zero_point is None:
        if t.method == "symmetric":
            return np.zeros(np.asarray(t.scale).shape, np.int64)
        raise ValueError(f"{name} has no zero_point")
    z = np.asarray(t.zero_point)
    if z.dtype.kind not in "iu":
        raise TypeError(f"{name}.zero_point must be an integer array, not {z.dtype}")
    lo, hi = (int(z.min()), int(z.max())) if z.size > 1 else (int(z.item()),) * 2
    if lo < -2**31 or hi >= 2**31:
        raise ValueError(f"{name}.zero_point must fit in int32")
    return z.astype(np.int64)


def _check_linear(t: QTensor, name: str) -> None:
    if not isinstance(t, QTensor):
        raise TypeError(f"{name} must be a QTensor, not {type(t).__name__}")
    if t.method not in LINEAR_METHODS:
        raise ValueError(f"{name} uses method {t.method!r}; qconv2d needs one of "
                         f"{LINEAR_METHODS} (an affine code-to-real map)")
    if t.codes.dtype not in (np.uint8, np.int8):
        raise TypeError(f"{name}.codes must be uint8 or int8, not {t.codes.dtype}")
    if t.scale is None:
        raise ValueError(f"{name} has no scale")
    scale = np.asarray(t.scale)
    if scale.dtype.kind != "f":
        raise TypeError(f"{name}.scale must be a float array")
    if not (math.isfinite(scale.item()) if scale.size == 1 else np.isfinite(scale).all()):
        raise ValueError(f"{name}.scale must be finite")


def check_activation(x: QTensor) -> tuple[np.float32, int]:
    """Validate per-tensor linear activations; return ``(s_x, z_x)``."""
    _check_linear(x, "x")
    s_x = np.asarray(x.scale, np.float32)
    z_x = _zero_point(x, "x")
    if x.axis is not None or s_x.size != 1 or z_x.size != 1:
        raise ValueError("x must be quantized per tensor "
                         "(per-channel activations are not supported)")
    return np.float32(s_x.item()), int(z_x.item())


def check_weights(w: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate linear weights; return ``(s_w, z_w)``, float32 and int64 of shape (O,)."""
    _check_linear(w, "w")
    o = w.codes.shape[0] if w.codes.ndim else 0
    s_w = np.asarray(w.scale, np.float32)
    z_w = _zero_point(w, "w")
    if w.axis is None and s_w.size == 1 and z_w.size == 1:
        return np.full(o, s_w.item(), np.float32), np.full(o, z_w.item(), np.int64)
    if w.axis == 0 and s_w.shape == (o,) and z_w.shape in ((o,), ()):
        return s_w, np.broadcast_to(z_w, (o,)).copy()
    raise ValueError(f"w must be quantized per tensor or per output channel (axis 0 with "
                     f"{o} scales); got axis={w.axis}, scale shape {s_w.shape}, "
                     f"zero_point shape {z_w.shape}")


def check_operands(x: QTensor, w: QTensor) -> tuple[np.float32, int, np.ndarray, np.ndarray]:
    """``check_activation(x) + check_weights(w)``: ``(s_x, z_x, s_w, z_w)``."""
    return check_activation(x) + check_weights(w)


def quantized_bias(bias: Any, s_x: np.float32, s_w: np.ndarray) -> np.ndarray | None:
    """Bias in accumulator units (int64, shape (O,)); float32 bias is rounded half-even."""
    if bias is None:
        return None
    if not isinstance(bias, np.ndarray):
        raise TypeError(f"bias must be a numpy array (int32 or float32), not {type(bias).__name__}")
    if bias.shape != s_w.shape:
        raise ValueError(f"bias must have shape {s_w.shape} (one per output channel), "
                         f"got {bias.shape}")
    if bias.dtype == np.int32:
        return bias.astype(np.int64)
    if bias.dtype != np.float32:
        raise TypeError(f"bias must be int32 (in units of s_x*s_w) or float32, not {bias.dtype}")
    unit = (s_x * s_w).astype(np.float64)  # float32(s_x*s_w), the unit finish() uses
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(bias.astype(np.float64) / unit)
    if not np.isfinite(q).all() or np.abs(q).max() > 2**31 - 1:
        raise ValueError("float bias / (s_x*s_w) does not fit in int32")
    return q.astype(np.int64)


def requant_params(out_scale: Any, out_zero_point: Any,
                   signed: bool) -> tuple[np.float32, int] | None:
    """Validated ``(s_y, z_y)`` for requantized output, or None for float output."""
    if out_scale is None:
        if out_zero_point is not None:
            raise ValueError("out_zero_point needs out_scale")
        return None
    s = np.asarray(out_scale)
    if s.size != 1 or s.dtype.kind not in "fiu":
        raise TypeError("out_scale must be a real scalar")
    s_y = np.float32(s.item())
    if not (np.isfinite(s_y) and s_y > 0):
        raise ValueError(f"out_scale must be finite and > 0, got {out_scale!r}")
    z = np.asarray(0 if out_zero_point is None else out_zero_point)
    if z.size != 1 or z.dtype.kind not in "iu":
        raise TypeError("out_zero_point must be an integer scalar")
    lo, hi = CODE_RANGE[np.dtype(np.int8 if signed else np.uint8)]
    z_y = int(z.item())
    if not lo <= z_y <= hi:
        raise ValueError(f"out_zero_point {z_y} is outside the output code range [{lo}, {hi}]")
    return s_y, z_y


def finish(core: np.ndarray, offset: np.ndarray | int, bias_q: np.ndarray | None,
           s_x: np.float32, s_w: np.ndarray, out: tuple[np.float32, int] | None,
           relu: bool, signed: bool) -> np.ndarray | QTensor:
    """Turn ``acc = core + offset[o]`` (exact integers, NCHW) into the result.

    With ``t = float32(acc + bias)`` (one correctly rounded conversion):
    float output ``t * float32(s_x * s_w)``; requantized, as onnxruntime does,
    ``sat(rint(t * M) + z_y)`` with ``M = float32(float32(s_x * s_w) / s_y)``.
    A float32 ``core`` is overwritten.
    """
    add = np.asarray(offset if bias_q is None else bias_q + offset).reshape(1, -1, 1, 1)
    if core.dtype == np.float32 and np.abs(add).max(initial=0) <= F32_EXACT:
        t = core  # core and add are exact in float32, so the sum rounds once
        t += add.astype(np.float32)
    elif core.dtype.kind in "iu":
        t = np.add(core, add.astype(np.int64), dtype=np.int64).astype(np.float32)
    else:  # float64 holds acc + bias exactly: |acc| <= 2**52
        t = np.add(core, add, dtype=np.float64).astype(np.float32)
    unit = (s_x * s_w).astype(np.float32).reshape(1, -1, 1, 1)
    if out is None:
        t *= unit
        return np.maximum(t, 0, out=t) if relu else t
    s_y, z_y = out
    t *= unit / s_y
    code = np.int8 if signed else np.uint8
    info = np.iinfo(code)
    # clamping before rint equals saturating after it: the bounds are integers
    np.clip(t, (max(info.min, z_y) if relu else info.min) - z_y, info.max - z_y, out=t)
    np.rint(t, out=t)
    t += np.float32(z_y)
    return QTensor(codes=t.astype(code), method="linear", bits=8, axis=None,
                   scale=np.array(s_y, np.float32), zero_point=np.array(z_y, np.int16))


def _im2col(xp: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """(N, C, Hp, Wp) -> contiguous (N, G, Cg*kH*kW, OH*OW), rows ordered (c, kh, kw)."""
    n, c, _, _ = xp.shape
    sn, sc, sh, sw = xp.strides
    cg = c // g.groups
    (kh, kw), (oh, ow) = g.kernel, g.out_hw
    view = as_strided(xp, (n, g.groups, cg, kh, kw, oh, ow),
                      (sn, cg * sc, sc, g.dilation[0] * sh, g.dilation[1] * sw,
                       g.stride[0] * sh, g.stride[1] * sw), writeable=False)
    return np.ascontiguousarray(view).reshape(n, g.groups, cg * kh * kw, oh * ow)


def _padded(codes: np.ndarray, shift: int, pad_value: int, g: ConvGeometry,
            dtype: type) -> np.ndarray:
    """codes - shift in ``dtype``, padded with pad_value - shift (the shifted code of real 0)."""
    top, left, bottom, right = g.padding
    n, c, h, w = codes.shape
    xp = np.empty((n, c, h + top + bottom, w + left + right), dtype)
    v = pad_value - shift
    xp[:, :, :top] = v
    xp[:, :, top + h:] = v
    xp[:, :, top:top + h, :left] = v
    xp[:, :, top:top + h, left + w:] = v
    np.subtract(codes, dtype(shift), out=xp[:, :, top:top + h, left:left + w], casting="unsafe")
    return xp


def _row_sums(m: np.ndarray, exact32: bool) -> np.ndarray:
    """Exact float64 row sums of an integer-valued matrix.

    sgemv when ``exact32`` says every partial sum stays within 2**24.
    """
    if exact32 and m.dtype == np.float32:
        return (m @ np.ones(m.shape[1], np.float32)).astype(np.float64)
    return m.astype(np.float64) @ np.ones(m.shape[1])


def _split(k: int, n: int) -> list[tuple[int, int]]:
    size = -(-k // n)
    return [(a, min(a + size, k)) for a in range(0, k, size)]


def _chunks(prep: _Prepared, amax: int, min_chunk: int) -> list[tuple[int, int]] | None:
    """Split K so that every float32 partial sum of a*b stays within 2**24.

    One chunk when ``amax * max_o sum_k |b_ok| <= 2**24``; else equal chunks
    of width ``2**24 / (amax * bmax)``, or, when that takes many, chunks whose
    rows' L1 norms fit. None when chunks would be narrower than ``min_chunk``
    (one dgemm is faster then).
    """
    k = prep.b.shape[1]
    if amax * prep.l1 <= F32_EXACT:
        return [(0, k)]
    width = F32_EXACT // max(amax * prep.bmax, 1)
    cheap = _split(k, -(-k // width)) if width >= min(k, min_chunk) else None
    budget = F32_EXACT // max(amax, 1)
    if (cheap is not None and len(cheap) <= 3) or budget == 0:
        return cheap  # an L1 pass costs about one more sgemm
    absb = np.abs(prep.b)
    n = -(-int(prep.l1) // budget)
    while -(-k // n) >= min(k, min_chunk) and (cheap is None or n < len(cheap)):
        chunks = _split(k, n)
        starts = [c[0] for c in chunks]
        if np.add.reduceat(absb, starts, axis=1, dtype=np.float64).max() <= budget:
            return chunks
        n *= 2
    return cheap


@dataclass(frozen=True)
class _Prepared:
    """``w - z_w`` as a float32 GEMM operand (O, K), with its exact bounds and row sums."""

    codes: np.ndarray  # private copy: a cache hit must equal it
    z_w: np.ndarray
    b: np.ndarray
    bmax: int  # max |b|
    l1: int  # max_o sum_k |b_ok|
    sums: np.ndarray  # float64 sum_k b_ok


_prep_cache: OrderedDict[int, _Prepared] = OrderedDict()
_prep_lock = threading.Lock()


def _prepare(codes: np.ndarray, z_w: np.ndarray) -> _Prepared:
    o = codes.shape[0]
    b = codes.reshape(o, -1).astype(np.float32)
    if z_w.any():
        b -= z_w.astype(np.float32)[:, None]  # exact: |z_w| < 2**23 here
    bmax = int(max(np.abs(int(codes.min()) - z_w).max(), np.abs(int(codes.max()) - z_w).max()))
    exact32 = bmax * b.shape[1] <= F32_EXACT  # float32 row sums are exact
    l1 = int(_row_sums(np.abs(b), exact32).max())
    b.flags.writeable = False
    return _Prepared(codes.copy(), z_w.copy(), b, bmax, l1, _row_sums(b, exact32))


def _prepared(codes: np.ndarray, z_w: np.ndarray) -> _Prepared:
    """Prepared weights, cached per array and checked against a private copy."""
    key = id(codes)
    with _prep_lock:
        p = _prep_cache.get(key)
    if p is not None and p.codes.shape == codes.shape and p.codes.dtype == codes.dtype \
            and np.array_equal(p.z_w, z_w) and np.array_equal(p.codes, codes):
        return p  # same content: whatever array now has this id, the result is the same
    p = _prepare(codes, z_w)
    with _prep_lock:
        _prep_cache[key] = p
        _prep_cache.move_to_end(key)
        while sum(e.b.nbytes + e.codes.nbytes for e in _prep_cache.values()) > PREP_CACHE_BYTES:
            _prep_cache.popitem(last=False)
    return p


def _bmax(lo: int, hi: int, z_w: np.ndarray) -> int:
    """max |w - z_w| for codes in [lo, hi]."""
    return int(max(np.abs(lo - z_w).max(), np.abs(hi - z_w).max()))


def _centre(lo: int, hi: int, z_x: int, padded: bool) -> tuple[int, int]:
    """Shift alpha centring the values of the im2col matrix, and max |x - alpha|."""
    if padded:  # padding taps hold z_x, the code of real 0
        lo, hi = min(lo, z_x), max(hi, z_x)
    alpha = (lo + hi + 1) // 2
    return alpha, max(alpha - lo, hi - alpha)


def _accumulate(x: QTensor, w: QTensor, g: ConvGeometry, z_x: int, z_w: np.ndarray,
                force: Path | None = None, min_chunk: int = MIN_F32_CHUNK,
                cache: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Exact accumulator as ``(core, offset, path)`` with acc = core + offset[o].

    With a = x_Q - alpha (padding taps = z_x - alpha) and b = w_Q - z_w:
    acc = sum(a*b) + (alpha - z_x) * sum_k(b), see docs/QCONV.md.
    """
    n = x.codes.shape[0]
    o, cg, kh, kw = w.codes.shape
    groups, k = g.groups, cg * kh * kw
    padded = any(g.padding)
    xi, wi = np.iinfo(x.codes.dtype), np.iinfo(w.codes.dtype)
    alpha, amax = _centre(xi.min, xi.max, z_x, padded)
    bmax = _bmax(wi.min, wi.max, z_w)
    prepare = _prepared if cache else _prepare
    prep = prepare(w.codes, z_w) if bmax < F32_EXACT // 2 else None
    l1 = prep.l1 if prep else bmax * k  # max_o sum_k |b_ok|
    if force is None and amax * l1 > F32_EXACT:  # tighten with the actual codes
        alpha, amax = _centre(int(x.codes.min()), int(x.codes.max()), z_x, padded)
    # |acc| <= max|x - z_x| * sum_k |b_ok|
    bound = (amax + abs(alpha - z_x)) * l1
    if bound >= 2**63:
        raise ValueError("zero points this large could overflow the int64 accumulator")
    chunks: list[tuple[int, int]] | None = None
    if prep is not None and bound <= F64_EXACT and force in (None, "f32"):
        chunks = _chunks(prep, amax, min_chunk)
    if force == "i64" or bound > F64_EXACT:
        b = w.codes.reshape(o, k).astype(np.int64) - z_w[:, None]
        sums = b.sum(axis=1)
    elif chunks is None:  # float64: exact below 2**53
        b = (w.codes.reshape(o, k).astype(np.float64) - z_w[:, None]) if prep is None \
            else prep.b.astype(np.float64)
        sums = prep.sums if prep is not None else b.sum(axis=1)
    else:
        assert prep is not None  # chunks come from prepared weights only
        b, sums = prep.b, prep.sums
    b = b.reshape(groups, o // groups, k)
    a = _im2col(_padded(x.codes, alpha, z_x, g, b.dtype.type), g)
    path = {"float32": "f32", "float64": "f64", "int64": "i64"}[b.dtype.name]
    if chunks is not None and len(chunks) > 1:
        core = np.zeros((n, groups, o // groups, a.shape[-1]), np.float64)
        for k0, k1 in chunks:
            core += np.matmul(b[..., k0:k1], a[..., k0:k1, :])
        path = f"f32x{len(chunks)}"
    else:
        core = np.matmul(b, a)  # sgemm / dgemm, or numpy's exact int64 loop
    offset = (alpha - z_x) * sums
    return core.reshape(n, o, *g.out_hw), offset, path


def accumulate(x: QTensor, w: QTensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
               groups: Any = 1) -> np.ndarray:
    """The exact int64 accumulator ``sum (x_Q - z_x)(w_Q - z_w)``, shape (N, O, OH, OW)."""
    _, z_x, _, z_w = check_operands(x, w)
    g = conv_geometry(x.codes.shape, w.codes.shape, stride, padding, dilation, groups)
    core, offset, _ = _accumulate(x, w, g, z_x, z_w)
    return core.astype(np.int64) + offset.astype(np.int64).reshape(1, -1, 1, 1)


def qconv2d(x: QTensor, w: QTensor, bias: np.ndarray | None = None, stride: Any = 1,
            padding: Any = 0, dilation: Any = 1, groups: int = 1, out_scale: Any = None,
            out_zero_point: Any = None, relu: bool = False, *,
            cache: bool = True) -> np.ndarray | QTensor:
    """2-D convolution of quantized NCHW activations with quantized OIHW weights.

    ``x``: per-tensor "linear"/"symmetric" QTensor (uint8 or int8 codes).
    ``w``: per-tensor or per-output-channel (axis 0) QTensor.
    ``bias``: int32 in units of ``s_x*s_w`` or float32 (rounded half-even to
    those units), shape (O,). ``padding``: int, (h, w) or (top, left, bottom,
    right); ``stride``/``dilation``: int or (h, w).

    Returns float32 NCHW ``(acc + bias) * s_x * s_w``, or with ``out_scale``
    (and ``out_zero_point``, default 0) a requantized 8-bit "linear" QTensor,
    bit-exact with onnxruntime's QLinearConv; int8 codes iff x is signed.
    ``relu`` clamps at 0 (float) or at the output zero point (codes).
    ``cache``: keep the prepared weights for reuse (weights used once: False).
    """
    s_x, z_x, s_w, z_w = check_operands(x, w)
    g = conv_geometry(x.codes.shape, w.codes.shape, stride, padding, dilation, groups)
    bias_q = quantized_bias(bias, s_x, s_w)
    out = requant_params(out_scale, out_zero_point, x.signed)
    core, offset, _ = _accumulate(x, w, g, z_x, z_w, cache=cache)
    return finish(core, offset, bias_q, s_x, s_w, out, bool(relu), x.signed)
