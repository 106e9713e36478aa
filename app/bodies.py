"""Request bodies: bounded reading, content negotiation, .npy and MessagePack tensors."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import msgpack
import numpy as np
from starlette.requests import ClientDisconnect, Request

from .problems import BodyTooLarge, InvalidParameters, MalformedBody, NotAcceptable

NPY = "application/x-npy"
MSGPACK = "application/msgpack"
MSGPACK_ALIASES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
OCTET_STREAM = "application/octet-stream"
TENSOR_TYPES = (NPY, MSGPACK)

MAX_NDIM = 64  # the bitstream's own limit on dimensions
_NPY_MAGIC = b"\x93NUMPY"
_DETAIL_MAX = 300
# Float dtypes only; no prefix means little-endian, as the wire format is explicit.
_MSGPACK_DTYPE = re.compile(r"([<>]?)(float16|float32|float64|f2|f4|f8)")
_MSGPACK_KEYS = frozenset({"dtype", "shape", "data"})


def media_type(header: str | None) -> str:
    """The bare, lower-case media type of a Content-Type header ('' when absent)."""
    return (header or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Content-Length {declared} exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # chunked or lying Content-Length: stop reading now
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer; keep it out of the 500s
        raise MalformedBody("the client disconnected before the body was complete") from None
    return b"".join(chunks)


def _quality(offer: str, ranges: list[tuple[str, float]]) -> float:
    """q of the most specific Accept range matching ``offer`` (0 if none does)."""
    major = offer.split("/", 1)[0] + "/*"
    best, q = -1, 0.0
    for rng, rq in ranges:
        rank = 2 if rng == offer else 1 if rng == major else 0 if rng == "*/*" else -1
        if rank > best:
            best, q = rank, rq
    return q


def negotiate(accept: str | None, offers: Sequence[str]) -> str:
    """The offer the Accept header prefers (ties go to the earlier offer); 406 if none."""
    if not accept or not accept.strip():
        return offers[0]
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        rng, *params = (p.strip() for p in part.split(";"))
        if not rng:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if q == q else 0.0  # q != q: NaN
        ranges.append((rng.lower(), q))
    chosen, best = "", 0.0
    for offer in offers:
        q = _quality(offer, ranges)
        if q > best:
            chosen, best = offer, q
    if not chosen:
        raise NotAcceptable(f"cannot produce any of {accept!r}; available: {', '.join(offers)}")
    return chosen


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _DETAIL_MAX else text[:_DETAIL_MAX] + "..."


def _check_count(shape: Sequence[int], max_elements: int) -> int:
    count = 1
    for d in shape:  # multiply step by step so a hostile shape cannot build a huge int
        count *= d
        if count > max_elements or d > max_elements:
            raise BodyTooLarge(f"tensor of shape {tuple(shape)} has more than "
                               f"{max_elements} elements")
    return count


def _npy_header(fp: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise MalformedBody(f".npy format version {version} is not supported")
    return shape, dtype


def decode_npy(body: bytes, max_elements: int) -> np.ndarray:
    """A .npy body as an array; the header is checked before anything is allocated."""
    if not body.startswith(_NPY_MAGIC):
        raise MalformedBody("not a .npy file (bad magic)")
    fp = io.BytesIO(body)
    try:
        shape, dtype = _npy_header(fp)
    except MalformedBody:
        raise
    except Exception as exc:  # numpy reports bad headers with assorted exception types
        raise MalformedBody(f"invalid .npy header: {_short(exc)}") from None
    if dtype.hasobject:
        raise MalformedBody(".npy files holding Python objects (pickles) are not accepted")
    if dtype.names is not None or dtype.subdtype is not None:
        raise InvalidParameters(f"structured dtype {dtype} is not supported; "
                                "use float16, float32 or float64")
    expected = _check_count(shape, max_elements) * dtype.itemsize
    if len(body) - fp.tell() != expected:
        raise MalformedBody(f".npy data is {len(body) - fp.tell()} bytes, header declares "
                            f"{expected}")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        raise MalformedBody(f"invalid .npy file: {_short(exc)}") from None
    if not isinstance(arr, np.ndarray):  # e.g. an .npz archive would be a mapping
        raise MalformedBody("not a single .npy array")
    return arr


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise MalformedBody(f"MessagePack extension types are not accepted (type {code})")


def _msgpack_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str):
        raise MalformedBody("'dtype' must be a string such as 'float32' or '>f4'")
    m = _MSGPACK_DTYPE.fullmatch(value)
    if m is None:
        raise InvalidParameters(f"dtype {value!r} is not supported; use float16, float32 or "
                                "float64 (optionally prefixed by '<' or '>')")
    return np.dtype(m.group(2)).newbyteorder(">" if m.group(1) == ">" else "<")


def decode_msgpack(body: bytes, max_elements: int, max_bytes: int) -> np.ndarray:
    """A MessagePack map {dtype, shape, data} as an array (a read-only view of ``body``)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              max_bin_len=max_bytes, max_str_len=256, max_array_len=MAX_NDIM,
                              max_map_len=len(_MSGPACK_KEYS), max_ext_len=0)
    except MalformedBody:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedBody(f"invalid MessagePack: {_short(exc)}") from None
    if not isinstance(obj, dict):
        raise MalformedBody("MessagePack body must be a map with keys dtype, shape and data")
    if set(obj) != _MSGPACK_KEYS:
        raise MalformedBody(f"MessagePack map must have exactly the keys dtype, shape and data, "
                            f"got {sorted(map(str, obj))}")
    dtype = _msgpack_dtype(obj["dtype"])
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MalformedBody("'shape' must be a list of non-negative integers")
    data = obj["data"]
    if not isinstance(data, bytes):
        raise MalformedBody("'data' must be MessagePack binary (bin), not "
                            f"{type(data).__name__}")
    expected = _check_count(shape, max_elements) * dtype.itemsize
    if len(data) != expected:
        raise MalformedBody(f"'data' is {len(data)} bytes; shape {shape} of {dtype.name} "
                            f"needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_tensor(kind: str, body: bytes, max_elements: int) -> np.ndarray:
    if kind == NPY:
        return decode_npy(body, max_elements)
    return decode_msgpack(body, max_elements, len(body))


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_msgpack(arr: np.ndarray) -> bytes:
    """The same map decode_msgpack reads; data is little-endian, C order."""
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    packed: bytes = msgpack.packb({"dtype": arr.dtype.name, "shape": list(arr.shape),
                                   "data": le.tobytes()}, use_bin_type=True)
    return packed


def encode_tensor(kind: str, arr: np.ndarray) -> bytes:
    return encode_npy(arr) if kind == NPY else encode_msgpack(arr)
