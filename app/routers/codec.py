"""The codec endpoints: compress, decompress, inspect, codecs."""

from __future__ import annotations

from functools import cache
from math import prod
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

import codec
from codec import container

from .. import bodies, options
from ..metrics import SNR_SAMPLE, STATE_KEY, observe_compression, snr_enabled
from ..problems import (BodyTooLarge, InvalidParameters, MalformedBitstream, ServiceUnavailable,
                        UnsupportedMediaType, responses)
from . import may_inline, offload, settings_of

router = APIRouter(prefix="/v1", tags=["codec"])

_BINARY = {"type": "string", "format": "binary"}
_MSGPACK_SCHEMA = {
    "type": "object",
    "description": "MessagePack map; data is the raw C-order element bytes",
    "required": ["dtype", "shape", "data"],
    "properties": {
        "dtype": {"type": "string", "enum": ["float16", "float32", "float64",
                                             "<f2", "<f4", "<f8", ">f2", ">f4", ">f8"],
                  "description": "no prefix means little-endian"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "string", "format": "binary"},
    },
}
_SIZE_HEADERS = {
    "X-Original-Bytes": {"description": "size of the tensor's raw elements",
                         "schema": {"type": "integer"}},
    "X-Compressed-Bytes": {"description": "size of the bitstream",
                           "schema": {"type": "integer"}},
}
_BITSTREAM_BODY = {"requestBody": {"required": True, "description": "a featcodec bitstream",
                                   "content": {bodies.OCTET_STREAM: {"schema": _BINARY}}}}
_DECODED_TYPES = (bodies.NPY, bodies.MSGPACK, "application/x-msgpack")
# Options of codec.encode itself (lossless stage, calibration, targets): typed query
# parameters of /v1/compress, documented from codec.api.ENCODE_OPTIONS.
_ENCODE_QUERY = ("entropy", "predictor", "clip", "percentile", "target_bits", "max_abs_error",
                 "target_snr_db")
_FIXED_QUERY = frozenset({"method", "bits", "axis", *_ENCODE_QUERY})
_ENCODE_DOC = codec.api.ENCODE_OPTIONS


@cache
def _linear_methods() -> frozenset[str]:
    """The uniform quantizers: the only methods cheap enough to run on the event loop
    (a compander's transcendental math costs ~5x more)."""
    return frozenset(m["name"] for m in codec.methods() if m["linear"])


def _set_method_label(request: Request, method: str) -> None:
    if method in options.method_names():  # bounded label values only
        setattr(request.state, STATE_KEY, method)


def _encode(arr: np.ndarray, method: str, bits: int, axis: int | None,
            params: dict[str, Any]) -> bytes:
    try:
        return codec.encode(arr, method=method, bits=bits, axis=axis, **params)
    except MemoryError:
        raise ServiceUnavailable("not enough memory for this tensor; retry later") from None
    except (TypeError, ValueError) as exc:  # the library's argument and data errors
        raise InvalidParameters(str(exc)) from None
    except codec.MissingExtraError as exc:  # e.g. entropy='ans' without featcodec[entropy]
        raise InvalidParameters(f"this server cannot do that: {exc}") from None


def _sample(arr: np.ndarray, axis: int | None) -> np.ndarray:
    """A deterministic strided view of about ``SNR_SAMPLE`` elements of ``arr`` (all of a
    smaller one), shaped (outer, channels, inner): every channel of ``axis`` stays in it,
    so the stream's per-channel parameters still apply to axis 1."""
    if axis is None:
        outer, channels, inner = 1, 1, arr.size
    else:
        outer, channels, inner = (prod(arr.shape[:axis]), arr.shape[axis],
                                  prod(arr.shape[axis + 1:]))
    x3 = arr.reshape(outer, channels, inner)
    step = -(-arr.size // SNR_SAMPLE)
    if step <= inner:
        return x3[:, :, ::step]
    return x3[::-(-step // inner), :, :1]  # rows shorter than the step: one element each


def _snr_db(arr: np.ndarray, h: container.Header) -> float:
    """SNR of the stream against ``arr`` on ``_sample(arr)``. A mapping's quantize and
    dequantize use only the stream's parameters, so with those from the header they give
    exactly ``decode(blob)`` at the sampled elements, with no decoding (or entropy
    decoding) of the rest. NaN for an all-zero sample, inf when exact."""
    x = _sample(arr, h.axis)
    axis = None if h.axis is None else 1
    codes = h.mapping.quantize(np.ascontiguousarray(x, dtype=np.float32), h.bits, axis,
                               h.signed, h.params,
                               restricted=bool(h.flags & container.FLAG_RESTRICTED))
    y = h.mapping.dequantize(codes, h.bits, axis, h.signed, h.params)
    xs = x.astype(np.float64).ravel()
    d = y.astype(h.dtype, copy=False).ravel() - xs  # as decode returns it
    # einsum, not np.dot: no BLAS call, whose own threads would contend with the pool's
    energy, err = float(np.einsum("i,i->", xs, xs)), float(np.einsum("i,i->", d, d))
    if energy <= 0:
        return float("nan")
    return float("inf") if err == 0 else float(10 * np.log10(energy / err))


def _measure(arr: np.ndarray, blob: bytes) -> str:
    """Record the stream's bits per element and (if enabled) SNR; return its method."""
    h = container.parse(blob, verify=False)  # our own fresh stream
    snr = None
    if snr_enabled() and arr.size:
        try:
            snr = _snr_db(arr, h)
        except (MemoryError, TypeError, ValueError):  # telemetry must not fail a request
            snr = None
    n = arr.size
    observe_compression(h.mapping.name, h.entropy, 8 * len(blob) / n if n else None, snr)
    return h.mapping.name


def _compress(kind: str, body: list[Any], max_elements: int, method: str, bits: int,
              axis: int | None, params: dict[str, Any]) -> tuple[bytes, int, str]:
    """Parse (MessagePack), encode and measure as one job: (stream, input bytes, method).
    ``body`` holds the only other reference to the request's tensor, popped so that it can
    be freed early: the array itself for .npy (parsed as it arrived), else the body's chunks."""
    arr = body.pop()
    if kind != bodies.NPY:
        arr = bodies.decode_msgpack_chunks(arr, max_elements)
    blob = _encode(arr, method, bits, axis, params)
    return blob, arr.nbytes, _measure(arr, blob)


def _peek(blob: bytes, max_elements: int) -> container.Header | None:
    """The stream's header unverified, or None if it does not parse (the job says why)."""
    try:
        return container.parse(blob, max_elements, verify=False)
    except (TypeError, ValueError):
        return None


def _header(blob: bytes, max_elements: int, max_bytes: int,
            h: container.Header | None = None) -> container.Header:
    """The stream's header (``h`` if already parsed by :func:`_peek`), refusing before any
    work a tensor larger than the body limit: a coded stream of a constant tensor is a
    few bytes whatever its size, so only the header bounds what decoding allocates."""
    if h is None:  # without the CRC, which decoding checks; errors come from the full parse
        h = _peek(blob, max_elements)
    if h is None or h.size * h.dtype.itemsize > max_bytes:
        h = container.parse(blob, max_elements)  # a corrupt stream is a 400, not a 413
        out_bytes = h.size * h.dtype.itemsize
        if out_bytes > max_bytes:
            raise BodyTooLarge(f"the decoded tensor would be {out_bytes} bytes, over the "
                               f"limit of {max_bytes} (FEATCODEC_MAX_BODY_BYTES)")
    return h


def _decompress(blob: bytes, max_elements: int, max_bytes: int, kind: str,
                h: container.Header | None) -> tuple[bytes, int, str]:
    """Decode and serialize as one job: (response body, tensor bytes, method).
    The tensor is decoded straight into the response body (its size is bounded by
    :func:`_header`; decode verifies the stream before writing into it)."""
    try:
        h = _header(blob, max_elements, max_bytes, h)
        body = bodies.fill_tensor(kind, h.shape, h.dtype, lambda out: codec.decode(
            blob, max_elements=max_elements, out=out))
    except MemoryError:
        raise ServiceUnavailable("not enough memory for this tensor; retry later") from None
    except (TypeError, ValueError) as exc:  # FormatError, and anything else the stream causes
        raise MalformedBitstream(str(exc)) from None
    return body, h.size * h.dtype.itemsize, h.mapping.name


def _inspect(blob: bytes, max_elements: int) -> dict[str, Any]:
    try:
        return codec.inspect(blob, max_elements=max_elements)
    except (TypeError, ValueError) as exc:
        raise MalformedBitstream(str(exc)) from None


async def _read_bitstream(request: Request) -> bytes:
    kind = bodies.media_type(request.headers.get("content-type"))
    if kind not in ("", bodies.OCTET_STREAM):
        raise UnsupportedMediaType(f"send the bitstream as {bodies.OCTET_STREAM}, not {kind}")
    return await bodies.read_body(request, settings_of(request).max_body_bytes)


@router.post(
    "/compress", response_class=Response, summary="Compress a tensor to a bitstream",
    openapi_extra={"requestBody": {"required": True, "content": {
        bodies.NPY: {"schema": _BINARY},
        bodies.MSGPACK: {"schema": _MSGPACK_SCHEMA},
    }}, "parameters": options.openapi_parameters()},
    responses={200: {"description": "the bitstream, byte for byte what codec.encode returns",
                     "headers": _SIZE_HEADERS,
                     "content": {bodies.OCTET_STREAM: {"schema": _BINARY}}},
               **responses(400, 413, 415, 422, 503)},
)
async def compress(
    request: Request,
    method: Annotated[str, Query(description="codec method (see GET /v1/codecs)",
                                 examples=["linear", "mulaw"])] = "linear",
    bits: Annotated[int, Query(description="bits per element; the range depends on the method",
                               examples=[8, 4])] = 8,
    axis: Annotated[int | None, Query(description="channel axis for per-channel parameters; "
                                                  "omit for per-tensor", examples=[1])] = None,
    entropy: Annotated[str | None, Query(description=_ENCODE_DOC["entropy"],
                                         examples=["ans", "auto"])] = None,
    predictor: Annotated[str | None, Query(description=_ENCODE_DOC["predictor"],
                                           examples=["auto", "lorenzo"])] = None,
    clip: Annotated[str | None, Query(description=_ENCODE_DOC["clip"],
                                      examples=["mse", "percentile"])] = None,
    percentile: Annotated[float | None, Query(description=_ENCODE_DOC["percentile"],
                                              examples=[99.99])] = None,
    target_bits: Annotated[float | None, Query(description=_ENCODE_DOC["target_bits"] + "; "
                                               "method=auto also picks the method",
                                               examples=[2.5])] = None,
    max_abs_error: Annotated[float | None, Query(description=_ENCODE_DOC["max_abs_error"],
                                                 examples=[0.01])] = None,
    target_snr_db: Annotated[float | None, Query(description=_ENCODE_DOC["target_snr_db"],
                                                 examples=[30])] = None,
) -> Response:
    """Quantize a tensor sent as `.npy` or MessagePack and return its bitstream.

    The method's options (listed by GET /v1/codecs) are further query parameters;
    given parameters skip calibration, exactly as in `codec.encode`. `entropy`,
    `predictor`, `clip`, `percentile` and the targets are `codec.encode`'s own options;
    with a target (or method=auto) the codec picks method, bits and clipping.
    """
    kind = bodies.media_type(request.headers.get("content-type"))
    kind = bodies.MSGPACK if kind in bodies.MSGPACK_ALIASES else kind
    if kind not in bodies.TENSOR_TYPES:
        raise UnsupportedMediaType(f"send the tensor as {bodies.NPY} or {bodies.MSGPACK}, "
                                   f"not {kind or 'no Content-Type'}")
    params = options.from_query(request.query_params, _FIXED_QUERY)
    encode_opts = {"entropy": entropy, "predictor": predictor, "clip": clip,
                   "percentile": percentile, "target_bits": target_bits,
                   "max_abs_error": max_abs_error, "target_snr_db": target_snr_db}
    params.update({k: v for k, v in encode_opts.items() if v is not None})
    _set_method_label(request, method)
    settings = settings_of(request)
    if kind == bodies.NPY:
        body: list[Any] = [await bodies.receive_npy(request, settings.max_body_bytes,
                                                    settings.max_elements)]
        size = body[0].nbytes
    else:
        body = [await bodies.read_chunks(request, settings.max_body_bytes)]
        size = sum(map(len, body[0]))
    plain = method in _linear_methods() and all(v is None for v in encode_opts.values())
    inline = plain and may_inline(request, size)
    blob, nbytes, chosen = await offload(_compress, kind, body, settings.max_elements,
                                         method, bits, axis, params, inline=inline)
    _set_method_label(request, chosen)  # method=auto: the chosen one
    return Response(blob, media_type=bodies.OCTET_STREAM,
                    headers={"X-Original-Bytes": str(nbytes),
                             "X-Compressed-Bytes": str(len(blob))})


@router.post(
    "/decompress", response_class=Response, summary="Decompress a bitstream to a tensor",
    openapi_extra=_BITSTREAM_BODY,
    responses={200: {"description": "the decoded tensor: .npy by default, MessagePack when "
                                    "Accept asks for it",
                     "headers": _SIZE_HEADERS,
                     "content": {bodies.NPY: {"schema": _BINARY},
                                 bodies.MSGPACK: {"schema": _MSGPACK_SCHEMA}}},
               **responses(400, 406, 413, 415, 503)},
)
async def decompress(request: Request) -> Response:
    """Verify and decode a bitstream (original shape and dtype)."""
    out_type = bodies.negotiate(request.headers.get("accept"), _DECODED_TYPES)
    blob = await _read_bitstream(request)
    settings = settings_of(request)
    kind = bodies.NPY if out_type == bodies.NPY else bodies.MSGPACK
    h = _peek(blob, settings.max_elements) if may_inline(request, len(blob)) else None
    inline = h is not None and h.mapping.linear and h.coding == container.CODING_RAW and \
        may_inline(request, h.size * h.dtype.itemsize)
    payload, nbytes, method = await offload(_decompress, blob, settings.max_elements,
                                            settings.max_body_bytes, kind, h, inline=inline)
    _set_method_label(request, method)
    return Response(payload, media_type=out_type,
                    headers={"X-Original-Bytes": str(nbytes),
                             "X-Compressed-Bytes": str(len(blob)), "Vary": "Accept"})


class InspectResult(BaseModel):
    """A bitstream's header, as returned by `codec.inspect`."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "format_version": 1, "method": "linear", "bits": 8, "signed": False,
        "restricted": False, "shape": [2, 3], "dtype": "float32", "axis": None,
        "params": {"scale": 0.0235, "zero_point": 0}, "elements": 6, "header_bytes": 20,
        "payload_bytes": 6, "total_bytes": 30, "original_bytes": 24, "ratio": 0.8,
        "bits_per_element": 40.0}]})

    format_version: int
    method: str
    bits: int
    signed: bool
    restricted: bool
    shape: list[int]
    dtype: str
    axis: int | None
    params: dict[str, int | float | list[int | float]]
    elements: int
    header_bytes: int
    payload_bytes: int
    total_bytes: int
    original_bytes: int
    ratio: float
    bits_per_element: float | None


@router.post("/inspect", response_model=InspectResult, summary="Describe a bitstream",
             openapi_extra=_BITSTREAM_BODY, responses=responses(400, 413, 415))
async def inspect(request: Request) -> dict[str, Any]:
    """Parse and verify a bitstream's header and checksum without decoding it."""
    blob = await _read_bitstream(request)
    info = await offload(_inspect, blob, settings_of(request).max_elements)
    _set_method_label(request, info["method"])
    return info


class StreamParam(BaseModel):
    name: str
    dtype: str
    per_channel: bool
    doc: str


class BitRanges(BaseModel):
    unsigned: tuple[int, int]
    signed: tuple[int, int]


class CodecInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    id: int
    linear: bool
    summary: str
    bits: BitRanges
    options: dict[str, str] = Field(description="query parameters accepted by /v1/compress")
    stream_params: list[StreamParam]


class CodecList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"methods": [{
        "name": "linear", "id": 1, "linear": True, "summary": "uniform affine quantizer",
        "bits": {"unsigned": [1, 8], "signed": [1, 8]},
        "options": {"scale": "step", "zero_point": "code of real 0", "signed": "signed codes"},
        "stream_params": [{"name": "scale", "dtype": "<f4", "per_channel": True,
                           "doc": "step"}]}]}]})

    methods: list[CodecInfo]


@router.get("/codecs", response_model=CodecList, summary="List the registered methods")
async def codecs() -> dict[str, Any]:
    """Every method registered in the library, with bit ranges and parameters."""
    return {"methods": codec.methods()}
