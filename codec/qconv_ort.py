"""onnxruntime backend for ``qconv2d``: same signature, identical results, faster.

Needs the optional packages ``onnxruntime`` and ``onnx`` (the one-node model
is built with ``onnx.helper``); both are imported on first use, never at
module import. Requantized output runs QLinearConv; float output runs
ConvInteger and scales the int32 accumulator with the numpy path's ``finish``.

Codes are re-encoded so that onnxruntime only sees the kernels that are exact
and fast (measured on onnxruntime 1.32, x86-64 AVX2, re-checked by
tests/test_qconv.py): int8 activations become uint8 (``x + 128``, zero point
``+ 128``; the output moves back the same way), and weights are fed as int8
only when every code is within +-64, else as uint8 (``w + 128``). Shifting a
code and its zero point together leaves every ``x - z_x`` and ``w - z_w``,
hence the accumulator, unchanged. Calls onnxruntime cannot take (zero points
outside the code range, an int32 accumulator overflow, per-channel weight
zero points for ConvInteger) go to the numpy path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MissingExtraError
from .qconv import (CODE_RANGE, ConvGeometry, check_activation, check_weights, conv_geometry,
                    finish, qconv2d, quantized_bias, requant_params)
from .qtensor import QTensor

__all__ = ["CACHE_SIZE", "clear_cache", "qconv2d_ort"]

CACHE_SIZE = 32  # weight tensors with prepared sessions
STATIC_PER_WEIGHT = 8  # sessions with constant scales kept per weight tensor
# u8 x s8 products on AVX2 without VNNI are summed in pairs in saturating int16
# (vpmaddubsw): exact only while 2 * 255 * max|w| <= 32767.
S8_MAX_ABS = 64
_OPSET = 13


@dataclass
class _Weights:
    """Validated weights, their re-encodings and their sessions."""

    codes: np.ndarray  # private copy: a cache hit must equal it
    axis: int | None
    s_w: np.ndarray
    z_w: np.ndarray
    ort_ok: bool = False  # zero points are codes: ONNX zero points have the code type
    bmax: int = 0  # max |w - z_w| over the code range
    enc: dict[str, tuple[np.ndarray, np.ndarray] | None] = field(default_factory=dict)
    sessions: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict)
    last: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)

    def encoding(self, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Weight codes and zero points as uint8 ("u8") or int8 ("s8"), if exact."""
        if kind not in self.enc:
            c = self.codes.astype(np.int16)
            shift = (128 if kind == "u8" else 0) - (128 if self.codes.dtype == np.uint8 else 0)
            c += shift
            ok = kind == "u8" or int(np.abs(c).max()) <= S8_MAX_ABS
            dt = np.uint8 if kind == "u8" else np.int8
            self.enc[kind] = (c.astype(dt), (self.z_w + shift).astype(dt)) if ok else None
        return self.enc[kind]


_cache: OrderedDict[int, _Weights] = OrderedDict()
_lock = threading.Lock()


def clear_cache() -> None:
    """Drop every cached weight entry and InferenceSession."""
    with _lock:
        _cache.clear()


def _entry(w: QTensor, cache: bool) -> _Weights:
    """The cache entry for ``w``; a hit must match its codes, scales and zero points."""
    s_w, z_w = check_weights(w)
    key = id(w.codes)
    with _lock:
        e = _cache.get(key)
    if e is not None and e.axis == w.axis and e.codes.shape == w.codes.shape \
            and e.codes.dtype == w.codes.dtype and np.array_equal(e.s_w, s_w) \
            and np.array_equal(e.z_w, z_w) and np.array_equal(e.codes, w.codes):
        with _lock:
            if key in _cache:
                _cache.move_to_end(key)
        return e
    lo, hi = CODE_RANGE[w.codes.dtype]
    e = _Weights(w.codes.copy(), w.axis, s_w, z_w, bool(lo <= z_w.min() and z_w.max() <= hi),
                 int(np.maximum(z_w - lo, hi - z_w).max()))
    if cache:
        with _lock:
            _cache[key] = e
            _cache.move_to_end(key)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return e


def _import() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError("ort", exc.name or "onnxruntime") from None
    return onnx, onnxruntime


def _build(op: str, wq: tuple[np.ndarray, np.ndarray], s_w: np.ndarray, per_channel: bool,
           channels: int, g: ConvGeometry, params: dict[str, np.ndarray], constant: bool,
           threads: tuple[int, int]) -> Any:
    """A one-node model on uint8 activations; ``params`` become initializers or inputs."""
    onnx, ort = _import()
    h, tp = onnx.helper, onnx.TensorProto
    ttype = {np.dtype(np.uint8): tp.UINT8, np.dtype(np.int8): tp.INT8,
             np.dtype(np.float32): tp.FLOAT, np.dtype(np.int32): tp.INT32}
    codes, zw = wq
    zshape = [len(zw)] if per_channel else []
    inits = [h.make_tensor("w", ttype[codes.dtype], codes.shape, codes.tobytes(), raw=True),
             h.make_tensor("w_zero_point", ttype[zw.dtype], zshape,
                           (zw if per_channel else zw[:1]).tobytes(), raw=True)]
    if op == "QLinearConv":
        inits.append(h.make_tensor("w_scale", tp.FLOAT, zshape,
                                   (s_w if per_channel else s_w[:1]).tobytes(), raw=True))
    inputs = [h.make_tensor_value_info("x", tp.UINT8, ["n", channels, "h", "w"])]
    for name, v in params.items():
        if constant:
            inits.append(h.make_tensor(name, ttype[v.dtype], v.shape, v.tobytes(), raw=True))
        else:
            inputs.append(h.make_tensor_value_info(name, ttype[v.dtype], list(v.shape)))
    if op == "ConvInteger":
        names, out_type = ["x", "w", "x_zero_point", "w_zero_point"], tp.INT32
    else:
        names = ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale",
                 "y_zero_point"] + (["B"] if "B" in params else [])
        out_type = tp.UINT8
    node = h.make_node(op, names, ["y"], strides=list(g.stride), pads=list(g.padding),
                       dilations=list(g.dilation), group=g.groups, kernel_shape=list(g.kernel))
    graph = h.make_graph([node], "qconv", inputs, [h.make_tensor_value_info("y", out_type, None)],
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", _OPSET)])
    model.ir_version = 8  # readable by older onnxruntime builds too
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _try_build(*args: Any) -> Any:
    try:
        return _build(*args)
    except MissingExtraError:
        raise
    except Exception:  # noqa: BLE001 - a kernel this onnxruntime build lacks: use numpy
        return None


def _session(e: _Weights, op: str, enc: str, channels: int, g: ConvGeometry,
             params: dict[str, np.ndarray], threads: tuple[int, int],
             cache: bool) -> tuple[Any, bool]:
    """A session for this call (None: use numpy) and whether its params are constants.

    Constant scales let onnxruntime precompute its requantization and run up
    to 1.4x faster, but each set of them needs its own session: one is built
    the second time the same set is seen; first sightings use a session that
    takes them as inputs.
    """
    wq = e.encoding(enc)
    assert wq is not None
    per_channel = e.axis is not None and op == "QLinearConv"  # ConvInteger: scalar only
    if not cache:
        return _try_build(op, wq, e.s_w, per_channel, channels, g, params, True, threads), True
    attrs = (g.stride, g.padding, g.dilation, g.groups, g.kernel)  # not out_hw: any H, W
    base = (op, enc, channels, attrs, threads, tuple(params))
    static_key = base + tuple(v.tobytes() for v in params.values())
    with _lock:
        if static_key in e.sessions:
            e.sessions.move_to_end(static_key)
            return e.sessions[static_key], True
        constant = op == "QLinearConv" and e.last.get(base) == static_key
        e.last[base] = static_key
        key = static_key if constant else base
        if key in e.sessions:
            return e.sessions[key], constant
    session = _try_build(op, wq, e.s_w, per_channel, channels, g, params, constant, threads)
    with _lock:
        e.sessions[key] = session
        statics = [k for k in e.sessions if len(k) > len(base)]
        for k in statics[:-STATIC_PER_WEIGHT]:
            del e.sessions[k]
    return session, constant


def qconv2d_ort(x: QTensor, w: QTensor, bias: np.ndarray | None = None, stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, groups: int = 1, out_scale: Any = None,
                out_zero_point: Any = None, relu: bool = False, *, intra_op_threads: int = 1,
                inter_op_threads: int = 1, cache: bool = True) -> np.ndarray | QTensor:
    """``codec.qconv.qconv2d`` on onnxruntime, with identical results.

    Sessions are cached per weight array (a hit must equal a private copy of
    the codes, scales and zero points, so in-place changes are picked up) and
    serve any N, H, W; ``cache=False`` builds a one-off session.
    ``intra_op_threads``/``inter_op_threads`` configure onnxruntime (default 1).
    """
    s_x, z_x = check_activation(x)
    e = _entry(w, cache)
    g = conv_geometry(x.codes.shape, w.codes.shape, stride, padding, dilation, groups)
    bias_q = quantized_bias(bias, s_x, e.s_w)
    out = requant_params(out_scale, out_zero_point, x.signed)
    lo, hi = CODE_RANGE[x.codes.dtype]
    bias_max = 0 if bias_q is None else int(np.abs(bias_q).max())
    if not (e.ort_ok and lo <= z_x <= hi) \
            or w.codes[0].size * max(z_x - lo, hi - z_x) * e.bmax + bias_max > 2**31 - 1 \
            or (out is None and np.any(e.z_w != e.z_w[0])):
        # zero points must be codes; onnxruntime accumulates in int32;
        # ConvInteger takes one weight zero point
        return qconv2d(x, w, bias, stride, padding, dilation, groups, out_scale, out_zero_point,
                       relu)
    shift = 128 if x.signed else 0
    xu = x.codes.view(np.uint8) ^ np.uint8(128) if x.signed else np.ascontiguousarray(x.codes)
    threads = (int(intra_op_threads), int(inter_op_threads))
    zx = np.array(z_x + shift, np.uint8)
    if out is None:
        session, constant = _session(e, "ConvInteger", "u8", x.codes.shape[1], g,
                                     {"x_zero_point": zx}, threads, cache)
        if session is None:
            return qconv2d(x, w, bias, stride, padding, dilation, groups, relu=relu)
        (acc,) = session.run(None, {"x": xu} if constant else {"x": xu, "x_zero_point": zx})
        return finish(acc, 0, bias_q, s_x, e.s_w, None, bool(relu), x.signed)
    s_y, z_y = out
    params: dict[str, np.ndarray] = {
        "x_scale": np.array(s_x, np.float32), "x_zero_point": zx,
        "y_scale": np.array(s_y, np.float32), "y_zero_point": np.array(z_y + shift, np.uint8)}
    if bias_q is not None:
        params["B"] = bias_q.astype(np.int32)
    enc = "s8" if e.encoding("s8") is not None else "u8"
    session, constant = _session(e, "QLinearConv", enc, x.codes.shape[1], g, params, threads,
                                 cache)
    if session is None:
        return qconv2d(x, w, bias, stride, padding, dilation, groups, out_scale, out_zero_point,
                       relu)
    (y,) = session.run(None, {"x": xu} if constant else {"x": xu, **params})
    if relu:
        np.maximum(y, np.uint8(z_y + shift), out=y)
    if x.signed:
        y = (y ^ np.uint8(128)).view(np.int8)
    return QTensor(codes=y, method="linear", bits=8, axis=None,
                   scale=np.array(s_y, np.float32), zero_point=np.array(z_y, np.int16))
