"""The public entry points: quantize/dequantize stop at the QTensor, encode/decode go to bytes."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import bitpack, calibrate, container, mappings, pipeline
from . import entropy as lossless
from .container import FLAG_RESTRICTED, FLAG_SIGNED
from .errors import MissingExtraError
from .mappings import blocks
from .qtensor import QTensor

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_F32_MAX = float(np.finfo(np.float32).max)


def _as_input(x: Any) -> tuple[np.ndarray, np.dtype]:
    """Validate the input tensor; return it as C-contiguous native float32 and its dtype."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"input is not an array: {exc}") from None
    if arr.dtype.kind != "f" or arr.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(f"input dtype must be float16, float32 or float64, not {arr.dtype}")
    dtype = arr.dtype.newbyteorder("=")
    if dtype == np.float64 and arr.size:
        finite = arr[np.isfinite(arr)]
        if finite.size and np.abs(finite).max() > _F32_MAX:
            raise ValueError("float64 input has finite values beyond the float32 range")
    # not ascontiguousarray: it turns a 0-d scalar into shape (1,)
    return np.asarray(arr, dtype=np.float32, order="C"), np.dtype(dtype)


def _check_nan(x: np.ndarray, allow_inf: bool, abs_sum: bool = False,
               axis: int | None = None) -> tuple[float, float] | None:
    """Refuse NaN (and Inf unless allowed); return the (min, max) of x, None when empty."""
    if x.size == 0:
        return None
    # One fused pass (NaN propagates through min/max); the fit reuses the range, per
    # channel along ``axis`` if given (and the sum of |x| when asked).
    lo, hi = blocks.checked_range(x, abs_sum, axis)
    if np.isnan(lo) or np.isnan(hi):
        raise ValueError("input contains NaN")
    if not allow_inf and not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("input contains Inf; give explicit parameters to saturate it")
    return float(lo), float(hi)


def _as_bits(bits: Any) -> int:
    if isinstance(bits, bool):
        raise TypeError("bits must be an integer")
    try:
        return operator.index(bits)
    except TypeError:
        raise TypeError(f"bits must be an integer, not {type(bits).__name__}") from None


def _as_axis(axis: Any, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool):
        raise TypeError("axis must be an integer or None")
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer or None, not {type(axis).__name__}") from None
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-d tensor")
    return a % ndim


@dataclass(frozen=True)
class _Fitted:
    """A validated input and everything needed to quantize it."""

    mapping: mappings.Mapping
    x32: np.ndarray
    dtype: np.dtype
    bits: int
    axis: int | None
    signed: bool
    restricted: bool
    params: dict[str, np.ndarray]
    x_range: tuple[float, float] | None  # (min, max) of x32

    def stream_flags(self) -> int:
        return _flags(self.signed, self.restricted and self.signed)


def _flags(signed: bool, restricted: bool) -> int:
    return (FLAG_SIGNED if signed else 0) | (FLAG_RESTRICTED if restricted else 0)


def _fit(x: Any, method: str, bits: Any, axis: Any, signed: bool | None,
         opts: dict[str, Any], clip: Any = "minmax", percentile: Any = 99.99) -> _Fitted:
    mapping = mappings.get(method)
    clip, percentile = calibrate.check_rule(clip, percentile)
    unknown = set(opts) - set(mapping.options) - {"signed"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {method!r}; "
                         f"accepted: {sorted(mapping.options)}")
    opts = {k: v for k, v in opts.items() if v is not None}
    x32, dtype = _as_input(x)
    bits = _as_bits(bits)
    axis = _as_axis(axis, x32.ndim)
    if signed is not None and not isinstance(signed, (bool, np.bool_)):
        raise TypeError("signed must be True, False or None")
    given = any(p.name in opts for p in mapping.params if p.name not in ("mu",))
    if given and clip != "minmax":
        raise ValueError(f"clip={clip!r} fits the range: it cannot go with given parameters")
    x_range = _check_nan(x32, allow_inf=given, abs_sum=mapping.wants_abs_sum(axis, opts),
                         axis=axis)
    # Validate bits for the requested sign first, then for the fitted one.
    for s in ({True, False} if signed is None else {bool(signed)}):
        lo, hi = mapping.bit_range(s)
        if signed is not None and not lo <= bits <= hi:
            raise ValueError(f"{method}: bits must be in [{lo}, {hi}]"
                             f"{' for signed codes' if s else ''}, got {bits}")
    if not 1 <= bits <= 8:
        raise ValueError(f"{method}: bits must be in [1, 8], got {bits}")
    is_signed, params = calibrate.fit(mapping, x32, bits, axis, signed, opts, clip, percentile)
    lo, hi = mapping.bit_range(is_signed)
    if not lo <= bits <= hi:
        raise ValueError(f"{method}: bits must be in [{lo}, {hi}] for "
                         f"{'signed' if is_signed else 'unsigned'} codes, got {bits}")
    mapping.check(params, bits, is_signed)
    return _Fitted(mapping, x32, dtype, bits, axis, bool(is_signed),
                   bool(opts.get("restricted", False)), params, x_range)


def _quantize(x: Any, method: str, bits: Any, axis: Any, signed: bool | None,
              opts: dict[str, Any], clip: Any = "minmax",
              percentile: Any = 99.99) -> tuple[QTensor, bool]:
    f = _fit(x, method, bits, axis, signed, opts, clip, percentile)
    mapping, params = f.mapping, f.params
    codes = mapping.quantize(f.x32, f.bits, f.axis, f.signed, params, restricted=f.restricted,
                             x_range=f.x_range)
    scale = params.get("scale") if mapping.linear else None
    zp = params.get("zero_point", np.zeros_like(scale, dtype=np.int16)) if mapping.linear else None
    extra = {k: v for k, v in params.items() if k not in ("scale", "zero_point")}
    q = QTensor(codes=codes, method=mapping.name, bits=f.bits, axis=f.axis, scale=scale,
                zero_point=zp, params=extra, dtype=f.dtype)
    return q, f.restricted and f.signed


def quantize(x: Any, method: str = "linear", bits: int = 8, axis: int | None = None,
             scale: Any = None, zero_point: Any = None, signed: bool | None = None,
             *, clip: str | None = None, percentile: float = 99.99, **params: Any) -> QTensor:
    """Map ``x`` to integer codes. Given ``scale``/``zero_point`` (or a method's own
    parameters) skip calibration, with ONNX QuantizeLinear semantics for linear methods;
    otherwise ``clip`` picks the fitted range (``minmax``, ``percentile``, ``mse``)."""
    if scale is not None:
        params["scale"] = scale
    if zero_point is not None:
        params["zero_point"] = zero_point
    return _quantize(x, method, bits, axis, signed, params, clip, percentile)[0]


def _stream_params(q: QTensor) -> dict[str, np.ndarray]:
    mapping = mappings.get(q.method)
    return {p.name: q.param(p.name) for p in mapping.params}


def dequantize(q: QTensor) -> np.ndarray:
    """Reconstruct float32 values from a QTensor."""
    mapping = mappings.get(q.method)
    return mapping.dequantize(q.codes, q.bits, q.axis, q.signed, _stream_params(q))


def _stored(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes offset by N/2 into [0, N-1], as uint8."""
    u = codes.view(np.uint8)
    if codes.dtype != np.int8:
        return u
    out = np.asarray(u + np.uint8(1 << (bits - 1)))  # asarray: 0-d arithmetic gives a scalar
    if bits < 8:
        out &= np.uint8((1 << bits) - 1)
    return out


# Options of encode itself (not of a method): the lossless stage, calibration and targets.
ENCODE_OPTIONS: dict[str, str] = {
    "entropy": "lossless stage after quantizing: 'ans' (rANS, near the codes' entropy), "
               "'zstd', 'auto' (the smallest installed; none if featcodec[entropy] is "
               "missing) or none (default: raw packed codes)",
    "predictor": "lossless prediction of the codes before the entropy coder: 'auto' "
                 "(default: whichever gives the smallest stream), 'none', 'delta' (along the "
                 "last axis) or 'lorenzo' (2-D, over the last two axes)",
    "clip": "range fitting: 'minmax' (default), 'percentile' or 'mse' (least squared error "
            "for the method and bit width); with a target the codec picks it",
    "percentile": "percentile of clip='percentile', in (50, 100] (default 99.99)",
    "target_bits": "size target in bits per element, every header byte and the lossless "
                   "stage included: the codec picks bits (and clipping) for the best SNR "
                   "within it",
    "max_abs_error": "guaranteed bound on |x - decoded| for every element: the codec picks "
                     "the smallest stream that keeps it",
    "target_snr_db": "quality target: the smallest stream with at least this SNR (dB)",
}


def encode(x: Any, method: str = "linear", bits: int = 8, axis: int | None = None, *,
           entropy: str | None = None, predictor: str = "auto", clip: str | None = None,
           percentile: float = 99.99, target_bits: float | None = None,
           max_abs_error: float | None = None, target_snr_db: float | None = None,
           **params: Any) -> bytes:
    """Quantize and pack ``x`` into a self-describing, checksummed bitstream.

    ``entropy``/``predictor`` add the lossless stage, ``clip``/``percentile`` choose the
    fitted range, and one of ``target_bits``, ``max_abs_error``, ``target_snr_db`` (or
    ``method="auto"``) lets the codec pick the method, bit width and clipping
    (docs/CODECS.md)."""
    signed = params.pop("signed", None)
    if (method == "auto" or target_bits is not None or max_abs_error is not None
            or target_snr_db is not None):
        from . import targets
        clip_rule = None if clip is None else calibrate.check_rule(clip, percentile)[0]
        return targets.encode(x, method, bits, axis, signed, params, clip_rule,
                              calibrate.check_rule(clip, percentile)[1], entropy, predictor,
                              target_bits, max_abs_error, target_snr_db)
    coders = lossless.coder_candidates(entropy)
    if not coders and entropy in (None, "none") and predictor not in (None, "auto", "none"):
        _predictors(predictor, coders, 2)  # the error above, before any work
    if not coders:  # raw codes: quantize, pack and checksum one segment at a time
        f = _fit(x, method, bits, axis, signed, params, clip, percentile)
        _predictors(predictor, coders, f.x32.ndim)
        header = container.write_header(
            f.mapping, f.stream_flags(), container.CODING_RAW, f.dtype, f.bits, f.x32.shape,
            f.axis, {p.name: f.params[p.name] for p in f.mapping.params},
            bitpack.packed_size(f.x32.size, f.bits))
        return pipeline.encode_raw(f.mapping, f.x32, f.bits, f.axis, f.signed, f.params,
                                   f.restricted, header, f.x_range)
    q, restricted = _quantize(x, method, bits, axis, signed, params, clip, percentile)
    return _encode_q(q, restricted, coders, _predictors(predictor, coders, q.codes.ndim))


def _predictors(predictor: Any, coders: list[int], ndim: int) -> list[int]:
    if predictor is None:
        predictor = "none"
    if not isinstance(predictor, str):
        raise TypeError(f"predictor must be a string, not {type(predictor).__name__}")
    cands = lossless.predictor_candidates(predictor, ndim)
    if not coders and predictor not in ("auto", "none"):
        raise ValueError(f"predictor={predictor!r} needs a lossless stage: give entropy="
                         f"'ans', 'zstd' or 'auto' (the featcodec[entropy] extra)")
    return cands


def _encode_q(q: QTensor, restricted: bool, coders: list[int],
              predictors: list[int]) -> bytes:
    """The stream of ``q`` with the smallest of the given lossless stages (or raw)."""
    mapping = mappings.get(q.method)
    flags = _flags(q.signed, restricted)
    coded = lossless.encode(_stored(q.codes, q.bits), q.bits, coders, predictors) \
        if coders else None
    if coded is None:
        payload = bitpack.pack(q.codes, q.bits, signed=q.signed, copy=False)
        header = container.write_header(mapping, flags, container.CODING_RAW, q.dtype, q.bits,
                                        q.shape, q.axis, _stream_params(q), payload.size)
        return container.seal(header, payload)
    coding, body = coded
    header = container.write_header(mapping, flags, coding, q.dtype, q.bits, q.shape, q.axis,
                                    _stream_params(q), len(body))
    return container.seal(header, body)


def encode_qtensor(q: QTensor, restricted: bool = False, *, entropy: str | None = None,
                   predictor: str = "auto") -> bytes:
    """Serialize an existing QTensor (codes must lie in its bit range), optionally with the
    lossless stage (``entropy``, ``predictor`` as in :func:`encode`)."""
    if entropy is None or entropy == "none":
        mapping = mappings.get(q.method)
        payload = bitpack.pack(q.codes, q.bits, signed=q.signed, copy=False)
        flags = _flags(q.signed, restricted)
        header = container.write_header(mapping, flags, container.CODING_RAW, q.dtype, q.bits,
                                        q.shape, q.axis, _stream_params(q), payload.size)
        return container.seal(header, payload)
    coders = lossless.coder_candidates(entropy)
    return _encode_q(q, restricted, coders, _predictors(predictor, coders, q.codes.ndim))


def decode_qtensor(blob: bytes | bytearray | memoryview,
                   max_elements: int = container.DEFAULT_MAX_ELEMENTS) -> QTensor:
    """Parse and verify a stream and unpack its codes, without dequantizing."""
    return _qtensor(container.parse(blob, max_elements), blob)


def _qtensor(h: container.Header, blob: bytes | bytearray | memoryview) -> QTensor:
    """The codes of a parsed, verified stream."""
    payload = memoryview(blob).cast("B")[h.payload_offset: h.payload_offset + h.payload_size]
    if h.coding == container.CODING_RAW:  # signed: unpack subtracts N/2 block by block
        codes = bitpack.unpack(payload, h.bits, h.size, signed=h.signed).reshape(h.shape)
    else:  # the lossless stage: bounded by the header's element count, see codec/entropy.py
        codes = lossless.decode(h.coding, payload, h.shape, h.bits)
        if h.signed:  # stored s = code + N/2; uint8 wrap-around then an int8 view undoes it
            codes -= np.uint8(1 << (h.bits - 1))
            codes = codes.view(np.int8)
    params = dict(h.params)
    scale = params.pop("scale", None) if h.mapping.linear else None
    zp = params.pop("zero_point", None) if h.mapping.linear else None
    if h.mapping.linear and zp is None:
        zp = np.zeros_like(scale, dtype=np.int16)
    return QTensor(codes=codes, method=h.mapping.name, bits=h.bits, axis=h.axis, scale=scale,
                   zero_point=zp, params=params, dtype=h.dtype)


def decode(blob: bytes | bytearray | memoryview,
           max_elements: int = container.DEFAULT_MAX_ELEMENTS, *,
           out: np.ndarray | None = None) -> np.ndarray:
    """Verify and decode a stream to an array of its original shape and dtype.

    ``out``, a writeable C-contiguous array of exactly that shape and dtype, receives the
    values instead of a new array (a server decoding same-sized tensors in a loop saves
    allocating and page-faulting a result each time); it is returned."""
    h = container.parse(blob, max_elements)
    if out is not None:
        _check_out(out, h, blob)
    if h.coding == container.CODING_RAW:  # unpack and dequantize one segment at a time
        return pipeline.decode_raw(h.mapping, memoryview(blob).cast("B"), h.payload_offset,
                                   h.bits, h.shape, h.axis, h.signed, h.params, h.dtype, out)
    q = _qtensor(h, blob)
    if out is not None and h.dtype == np.float32:
        return h.mapping.dequantize(q.codes, q.bits, q.axis, q.signed, _stream_params(q), out)
    values = dequantize(q)
    if out is not None:
        np.copyto(out, values, casting="unsafe")
        return out
    return values if q.dtype == np.float32 else values.astype(q.dtype)


def _check_out(out: Any, h: container.Header, blob: bytes | bytearray | memoryview) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, not {type(out).__name__}")
    if out.dtype != h.dtype or out.shape != h.shape:
        raise ValueError(f"out must be {h.dtype.name} of shape {h.shape}, the stream's; got "
                         f"{out.dtype.name} of shape {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, np.frombuffer(memoryview(blob).cast("B"), np.uint8)):
        raise ValueError("out overlaps the stream being decoded")


def inspect(blob: bytes | bytearray | memoryview,
            max_elements: int = container.DEFAULT_MAX_ELEMENTS) -> dict[str, Any]:
    """A stream's header as plain Python values, without decoding the payload."""
    h = container.parse(blob, max_elements)
    n = h.size
    original = n * h.dtype.itemsize
    lossless_info: dict[str, Any] = {}
    if h.coding != container.CODING_RAW:
        # A coded payload is verified (decoded, not dequantized), so inspect accepts exactly
        # the streams decode accepts; without the extra the header is still reported.
        lossless_info = {"entropy": h.entropy, "predictor": h.predictor,
                         "packed_bytes": h.packed_size}
        try:
            payload = memoryview(blob).cast("B")[h.payload_offset:
                                                 h.payload_offset + h.payload_size]
            lossless.decode(h.coding, payload, h.shape, h.bits)
        except MissingExtraError as exc:
            lossless_info["missing_extra"] = exc.extra
    return {
        "format_version": h.version,
        "method": h.mapping.name,
        "bits": h.bits,
        "signed": h.signed,
        "restricted": bool(h.flags & FLAG_RESTRICTED),
        "shape": list(h.shape),
        "dtype": h.dtype.name,
        "axis": h.axis,
        "params": {k: (v.item() if v.ndim == 0 else v.tolist()) for k, v in h.params.items()},
        "elements": n,
        "header_bytes": h.payload_offset,
        "payload_bytes": h.payload_size,
        "total_bytes": h.total_size,
        "original_bytes": original,
        "ratio": (original / h.total_size),
        "bits_per_element": (8 * h.total_size / n) if n else None,
        **lossless_info,
    }


def methods() -> list[dict[str, Any]]:
    """The registered methods with their bit ranges and parameters."""
    return mappings.methods()
