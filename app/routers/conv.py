"""POST /v1/conv2d, and the convolution machinery shared with app/routers/layers.py.

The activations arrive as a featcodec bitstream and are convolved on their
codes (``codec.decode_qtensor``, no dequantize step) by ``codec.qconv2d`` or
its onnxruntime twin ``codec.qconv_ort.qconv2d_ort`` (identical results,
docs/QCONV.md), chosen by ``FEATCODEC_CONV_BACKEND``. Decoding, the
convolution and serializing the result run as one job in the worker thread
pool; the time of each step is sent back in ``Server-Timing``.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack
import numpy as np
from fastapi import APIRouter, Request, Response

import codec
from codec.errors import MissingExtraError
from codec.qconv import ConvGeometry, conv_geometry, qconv2d
from codec.qtensor import QTensor

from .. import bodies, options
from ..metrics import CONV_SECONDS, STATE_KEY
from ..problems import (BodyTooLarge, InvalidParameters, MalformedBitstream, MalformedBody,
                        ServiceUnavailable, UnsupportedMediaType, responses)
from ..settings import Settings
from . import offload, settings_of

log = logging.getLogger("featcodec.service")
router = APIRouter(prefix="/v1", tags=["conv"])

FLOAT_TYPES = (bodies.NPY, bodies.MSGPACK, "application/x-msgpack")
QUANTIZED_TYPES = (bodies.OCTET_STREAM,)
CONV_KEYS = ("x", "w", "bias", "stride", "padding", "dilation", "groups", "relu", "out_scale",
             "out_zero_point")
ATTR_DEFAULTS: dict[str, Any] = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_FLOAT_DTYPE = re.compile(r"([<>]?)(float16|float32|float64|f2|f4|f8)")
_BIAS_DTYPE = re.compile(r"([<>]?)(float32|int32|f4|i4)")
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
_DETAIL_MAX = 300
_MAP_MAX = 16

# --- OpenAPI -------------------------------------------------------------------------------

BINARY = {"type": "string", "format": "binary"}
_INTS = {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]}


def tensor_map_schema(dtypes: list[str], description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "required": ["dtype", "shape", "data"],
            "properties": {"dtype": {"type": "string", "enum": dtypes,
                                     "description": "no prefix means little-endian"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "data": BINARY}}


WEIGHTS_SCHEMA = {"oneOf": [
    {**BINARY, "description": "a featcodec bitstream of quantized OIHW weights (method linear "
                              "or symmetric, per tensor or per output channel, axis 0)"},
    tensor_map_schema(["float16", "float32", "float64", "<f2", "<f4", "<f8", ">f2", ">f4", ">f8"],
                      "float OIHW weights; the server quantizes them per output channel: "
                      "codec.quantize(w, 'symmetric', 8, axis=0, signed=True, restricted=True)"),
]}
BIAS_SCHEMA = tensor_map_schema(
    ["float32", "int32", "<f4", "<i4", ">f4", ">i4"],
    "shape (O,): float32 (real values) or int32 (ONNX QLinearConv bias, in units of s_x*s_w)")
ATTR_SCHEMAS: dict[str, Any] = {
    "stride": {**_INTS, "description": "int or [h, w]; default 1"},
    "padding": {**_INTS, "description": "int, [h, w] or [top, left, bottom, right]; default 0"},
    "dilation": {**_INTS, "description": "int or [h, w]; default 1"},
    "groups": {"type": "integer", "minimum": 1,
               "description": "divides C and O; C for depthwise; default 1"},
}
CONV_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "MessagePack map; binary fields are MessagePack bin",
    "required": ["x", "w"],
    "properties": {
        "x": {**BINARY, "description": "featcodec bitstream of the activations: NCHW, method "
                                       "linear or symmetric, per tensor"},
        "w": WEIGHTS_SCHEMA,
        "bias": BIAS_SCHEMA,
        **ATTR_SCHEMAS,
        "relu": {"type": "boolean", "description": "clamp at 0 (at the output zero point for "
                                                   "requantized output); default false"},
        "out_scale": {"type": "number", "exclusiveMinimum": 0,
                      "description": "requantize the output to 8-bit codes with this scale"},
        "out_zero_point": {"type": "integer", "description": "zero point of the requantized "
                                                             "output (default 0; needs out_scale)"},
    },
}
CONV_BODY_EXAMPLE = {
    "x": "<featcodec bitstream, e.g. codec.encode(x) for x of shape (1, 64, 56, 56)>",
    "w": {"dtype": "float32", "shape": [64, 64, 3, 3], "data": "<147456 bytes>"},
    "bias": {"dtype": "float32", "shape": [64], "data": "<256 bytes>"},
    "stride": 1, "padding": 1, "dilation": 1, "groups": 1, "relu": True,
    "out_scale": 0.05, "out_zero_point": 0,
}
TIMING_HEADERS = {
    "Server-Timing": {
        "description": "time of each step inside the handler, in ms: parse (body) or load "
                       "(stored layer), decode (activations), conv (the convolution; desc "
                       "names the backend), encode (the response body)",
        "schema": {"type": "string"},
        "example": 'load;dur=0.012, decode;dur=0.214, conv;dur=1.830;desc="ort", '
                   'encode;dur=0.020'},
    "X-Conv-Backend": {"description": "the backend that ran the convolution: ort or numpy",
                       "schema": {"type": "string", "enum": ["ort", "numpy"]}},
}
CONV_RESPONSE = {
    "description": "with out_scale: the requantized output as a featcodec bitstream "
                   "(codec.encode_qtensor of qconv2d's QTensor); without: the float32 NCHW "
                   "output as .npy (default) or MessagePack, as Accept asks",
    "headers": TIMING_HEADERS,
    "content": {bodies.OCTET_STREAM: {"schema": BINARY},
                bodies.NPY: {"schema": BINARY},
                bodies.MSGPACK: {"schema": tensor_map_schema(["float32"], "the output")}},
}


# --- backends ------------------------------------------------------------------------------


@functools.cache
def _ort_missing() -> str | None:
    """The optional module the onnxruntime backend lacks, or None when it is usable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return exc.name or "onnxruntime"
    return None


def backend(settings: Settings) -> str:
    """``"ort"`` or ``"numpy"`` per FEATCODEC_CONV_BACKEND; 503 if ort is asked for but
    missing."""
    if settings.conv_backend == "numpy":
        return "numpy"
    missing = _ort_missing()
    if missing is None:
        return "ort"
    if settings.conv_backend == "ort":
        raise ServiceUnavailable(f"FEATCODEC_CONV_BACKEND=ort but the optional dependency "
                                 f"{missing!r} is not installed (pip install 'featcodec[ort]')")
    return "numpy"


def warm_up(settings: Settings) -> str:
    """Import and exercise the conv backend at startup; RuntimeError if it is unusable."""
    try:
        name = backend(settings)
    except ServiceUnavailable as exc:
        raise RuntimeError(exc.detail) from None
    x = codec.quantize(np.linspace(0, 1, 9, dtype=np.float32).reshape(1, 1, 3, 3))
    w = codec.quantize(np.ones((1, 1, 1, 1), np.float32), "symmetric", 8, axis=0, signed=True,
                       restricted=True)
    for out_scale in (None, 0.1):
        compute(name, x, w, ConvArgs(out_scale=out_scale), cache=False)
    log.info("conv2d backend: %s (FEATCODEC_CONV_BACKEND=%s)", name, settings.conv_backend)
    return name


@dataclass
class ConvArgs:
    bias: np.ndarray | None = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: Any = 1
    relu: bool = False
    out_scale: Any = None
    out_zero_point: Any = None


def compute(name: str, x: QTensor, w: QTensor, args: ConvArgs,
            cache: bool) -> np.ndarray | QTensor:
    """qconv2d on the named backend. ``cache``: keep prepared weights or onnxruntime
    sessions for ``w`` (registered layers; inline weights are new on every request)."""
    kwargs = dict(bias=args.bias, stride=args.stride, padding=args.padding,
                  dilation=args.dilation, groups=args.groups, out_scale=args.out_scale,
                  out_zero_point=args.out_zero_point, relu=args.relu)
    if name == "ort":
        from codec.qconv_ort import qconv2d_ort
        return qconv2d_ort(x, w, **kwargs, cache=cache)
    return qconv2d(x, w, **kwargs, cache=cache)


# --- request parsing -----------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _DETAIL_MAX else text[:_DETAIL_MAX] + "..."


def _kind(value: Any) -> str:
    """The MessagePack type of a decoded value, for messages."""
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"),
                    (bytes, "bin"), (list, "array"), (dict, "map")):
        if isinstance(value, t):
            return name
    return "nil" if value is None else type(value).__name__


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise MalformedBody(f"MessagePack extension types are not accepted (type {code})")


def unpack_map(body: bytes, allowed: tuple[str, ...], required: tuple[str, ...]
               ) -> dict[str, Any]:
    """A MessagePack map body with only ``allowed`` keys; nil values count as absent."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              max_bin_len=len(body), max_str_len=256,
                              max_array_len=bodies.MAX_NDIM, max_map_len=_MAP_MAX,
                              max_ext_len=0)
    except MalformedBody:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedBody(f"invalid MessagePack: {_short(exc)}") from None
    if not isinstance(obj, dict):
        raise MalformedBody(f"the body must be a MessagePack map, not {_kind(obj)}")
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in obj if k not in allowed)
    if unknown:
        raise InvalidParameters(f"unknown key(s) {', '.join(unknown)}; accepted: "
                                f"{', '.join(allowed)}")
    obj = {k: v for k, v in obj.items() if v is not None}
    missing = [k for k in required if k not in obj]
    if missing:
        raise InvalidParameters(f"missing key(s): {', '.join(missing)}")
    return obj


def decode_bitstream(blob: bytes, what: str, max_elements: int) -> QTensor:
    try:
        return codec.decode_qtensor(blob, max_elements=max_elements)
    except MemoryError:
        raise ServiceUnavailable("not enough memory for this tensor; retry later") from None
    except MissingExtraError as exc:
        raise InvalidParameters(f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:  # FormatError and whatever else the stream causes
        raise MalformedBitstream(f"{what}: {_short(exc)}") from None


def _count(shape: list[int], max_elements: int, what: str) -> int:
    count = 1
    for d in shape:  # step by step so a hostile shape cannot build a huge int
        count *= d
        if count > max_elements or d > max_elements:
            raise BodyTooLarge(f"{what} of shape {tuple(shape)} has more than {max_elements} "
                               "elements")
    return count


def tensor_map(value: Any, what: str, pattern: re.Pattern[str], allowed: str,
               max_elements: int) -> np.ndarray:
    """A MessagePack tensor map ``{dtype, shape, data}`` as a native-endian array."""
    if not isinstance(value, dict) or set(value) != _TENSOR_KEYS:
        keys = sorted(map(str, value)) if isinstance(value, dict) else _kind(value)
        raise MalformedBody(f"{what} must be a map with exactly the keys dtype, shape and data, "
                            f"got {keys}")
    dtype_text, shape, data = value["dtype"], value["shape"], value["data"]
    m = pattern.fullmatch(dtype_text) if isinstance(dtype_text, str) else None
    if m is None:
        raise InvalidParameters(f"{what}: dtype {dtype_text!r} is not supported; use {allowed} "
                                "(optionally prefixed by '<' or '>')")
    dtype = np.dtype(m.group(2)).newbyteorder(">" if m.group(1) == ">" else "<")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MalformedBody(f"{what}: 'shape' must be a list of non-negative integers")
    if not isinstance(data, bytes):
        raise MalformedBody(f"{what}: 'data' must be MessagePack bin, not {_kind(data)}")
    expected = _count(shape, max_elements, what) * dtype.itemsize
    if len(data) != expected:
        raise MalformedBody(f"{what}: 'data' is {len(data)} bytes; shape {shape} of "
                            f"{dtype.name} needs {expected}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def weights_from(value: Any, max_elements: int) -> tuple[QTensor, bytes | None]:
    """Weights from a bitstream (returned too) or from float weights (quantized here)."""
    if isinstance(value, bytes):
        return decode_bitstream(value, "w", max_elements), value
    if not isinstance(value, dict):
        raise InvalidParameters(f"w must be a featcodec bitstream (bin) or a tensor map "
                                f"{{dtype, shape, data}} of float weights, not {_kind(value)}")
    arr = tensor_map(value, "w", _FLOAT_DTYPE, "float16, float32 or float64", max_elements)
    try:
        return codec.quantize(arr, "symmetric", 8, axis=0, signed=True, restricted=True), None
    except MemoryError:
        raise ServiceUnavailable("not enough memory for these weights; retry later") from None
    except (TypeError, ValueError) as exc:
        raise InvalidParameters(f"w: {exc}") from None


def bias_from(value: Any, max_elements: int) -> np.ndarray | None:
    if value is None:
        return None
    return tensor_map(value, "bias", _BIAS_DTYPE, "float32 or int32", max_elements)


def attrs_from(obj: dict[str, Any]) -> dict[str, Any]:
    """stride, padding, dilation (int or list of ints) and groups (int), defaults filled."""
    out = dict(ATTR_DEFAULTS)
    for key in ("stride", "padding", "dilation"):
        if key not in obj:
            continue
        v = obj[key]
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, list) and all(
            isinstance(e, int) and not isinstance(e, bool) for e in v))
        if not ok:
            raise InvalidParameters(f"{key} must be an integer or a list of integers, "
                                    f"not {_kind(v)}")
        out[key] = v
    if "groups" in obj:
        g = obj["groups"]
        if not isinstance(g, int) or isinstance(g, bool):
            raise InvalidParameters(f"groups must be an integer, not {_kind(g)}")
        out["groups"] = g
    return out


def _conv_args(obj: dict[str, Any], max_elements: int) -> ConvArgs:
    relu = obj.get("relu", False)
    if not isinstance(relu, bool):
        raise InvalidParameters(f"relu must be true or false, not {_kind(relu)}")
    out_scale = obj.get("out_scale")
    if out_scale is not None and (isinstance(out_scale, bool)
                                  or not isinstance(out_scale, (int, float))):
        raise InvalidParameters(f"out_scale must be a number, not {_kind(out_scale)}")
    zp = obj.get("out_zero_point")
    if zp is not None and (isinstance(zp, bool) or not isinstance(zp, int)):
        raise InvalidParameters(f"out_zero_point must be an integer, not {_kind(zp)}")
    return ConvArgs(bias=bias_from(obj.get("bias"), max_elements), relu=relu,
                    out_scale=out_scale, out_zero_point=zp, **attrs_from(obj))


def output_type(accept: str | None, requantized: bool) -> str:
    """The response media type: a bitstream for requantized output, else .npy or
    MessagePack per Accept; 406 when Accept allows none of them."""
    return bodies.negotiate(accept, QUANTIZED_TYPES if requantized else FLOAT_TYPES)


# --- the job -------------------------------------------------------------------------------


@dataclass
class ConvOutput:
    payload: bytes
    media_type: str
    backend: str
    method: str  # the activations' codec method (metrics label)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def response(self, request: Request, status_code: int = 200) -> Response:
        if self.method in options.method_names():  # bounded label values only
            setattr(request.state, STATE_KEY, self.method)
        parts = []
        for name, seconds in self.timings:
            desc = f';desc="{self.backend}"' if name == "conv" else ""
            parts.append(f"{name};dur={seconds * 1e3:.3f}{desc}")
        return Response(self.payload, status_code=status_code, media_type=self.media_type,
                        headers={"Server-Timing": ", ".join(parts),
                                 "X-Conv-Backend": self.backend, "Vary": "Accept"})


def _geometry(x: QTensor, w: QTensor, args: ConvArgs, max_elements: int) -> ConvGeometry:
    """Validated attributes; 413 when the output or the im2col matrix would be too large."""
    try:
        g = conv_geometry(x.shape, w.shape, args.stride, args.padding, args.dilation,
                          args.groups)
    except (TypeError, ValueError) as exc:
        raise InvalidParameters(str(exc)) from None
    n, c = x.shape[:2]
    (oh, ow), (kh, kw) = g.out_hw, g.kernel
    for what, count in (("output", n * w.shape[0] * oh * ow),
                        ("im2col matrix", n * c * kh * kw * oh * ow)):
        if count > max_elements:
            raise BodyTooLarge(f"the convolution's {what} would have {count} elements, more "
                               f"than {max_elements} (FEATCODEC_MAX_ELEMENTS)")
    return g


def convolve(x_blob: bytes, w: QTensor, args: ConvArgs, out_type: str, backend_name: str,
             max_elements: int, cache: bool, endpoint: str,
             timings: list[tuple[str, float]]) -> ConvOutput:
    """Decode the activations, convolve, serialize: one job for the thread pool."""
    t0 = time.perf_counter()
    x = decode_bitstream(x_blob, "x", max_elements)
    t1 = time.perf_counter()
    _geometry(x, w, args, max_elements)
    try:
        y = compute(backend_name, x, w, args, cache)
    except MemoryError:
        raise ServiceUnavailable("not enough memory for this convolution; retry later") from None
    except (TypeError, ValueError) as exc:  # qconv2d's argument and data errors
        raise InvalidParameters(str(exc)) from None
    t2 = time.perf_counter()
    CONV_SECONDS.labels(endpoint, backend_name).observe(t2 - t1)
    if isinstance(y, QTensor):
        payload = codec.encode_qtensor(y)
    else:
        payload = bodies.encode_tensor(bodies.NPY if out_type == bodies.NPY else bodies.MSGPACK,
                                       y)
    t3 = time.perf_counter()
    timings += [("decode", t1 - t0), ("conv", t2 - t1), ("encode", t3 - t2)]
    return ConvOutput(payload, out_type, backend_name, x.method, timings)


def _inline_job(body: bytes, accept: str | None, backend_name: str,
                max_elements: int) -> ConvOutput:
    t0 = time.perf_counter()
    obj = unpack_map(body, CONV_KEYS, ("x", "w"))
    args = _conv_args(obj, max_elements)
    out_type = output_type(accept, args.out_scale is not None)
    x_blob = obj["x"]
    if not isinstance(x_blob, bytes):
        raise InvalidParameters(f"x must be a featcodec bitstream (MessagePack bin), "
                                f"not {_kind(x_blob)}")
    w, _ = weights_from(obj["w"], max_elements)
    timings = [("parse", time.perf_counter() - t0)]
    return convolve(x_blob, w, args, out_type, backend_name, max_elements, cache=False,
                    endpoint="/v1/conv2d", timings=timings)


@router.post(
    "/conv2d", response_class=Response, summary="Convolve quantized activations",
    openapi_extra={"requestBody": {"required": True, "content": {bodies.MSGPACK: {
        "schema": CONV_BODY_SCHEMA, "example": CONV_BODY_EXAMPLE}}}},
    responses={200: CONV_RESPONSE, **responses(400, 406, 413, 415, 422, 503)},
)
async def conv2d(request: Request) -> Response:
    """2-D convolution computed on the activations' integer codes (`codec.qconv2d`).

    The float output equals `codec.qconv2d(codec.decode_qtensor(x), w, ...)`; the
    requantized bitstream is byte for byte `codec.encode_qtensor` of it. Float
    weights are quantized per output channel, symmetric int8, first.
    """
    kind = bodies.media_type(request.headers.get("content-type"))
    if kind not in bodies.MSGPACK_ALIASES:
        raise UnsupportedMediaType(f"send the request as a MessagePack map ({bodies.MSGPACK}), "
                                   f"not {kind or 'no Content-Type'}")
    settings = settings_of(request)
    name = backend(settings)
    body = await bodies.read_body(request, settings.max_body_bytes)
    out = await offload(_inline_job, body, request.headers.get("accept"), name,
                        settings.max_elements)
    return out.response(request)
