"""Request bodies: bounded reading, content negotiation, .npy and MessagePack tensors."""

from __future__ import annotations

import functools
import io
import re
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from itertools import accumulate
from math import prod
from typing import Any, NoReturn

import msgpack
import numpy as np
from starlette.requests import ClientDisconnect, Request

from codec.outbytes import OutBytes

from .problems import BodyTooLarge, InvalidParameters, MalformedBody, NotAcceptable

NPY = "application/x-npy"
MSGPACK = "application/msgpack"
MSGPACK_ALIASES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
OCTET_STREAM = "application/octet-stream"
TENSOR_TYPES = (NPY, MSGPACK)

MAX_NDIM = 64  # the bitstream's own limit on dimensions
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # bytes: numpy's own default limit (max_header_size)
# magic, version, header length and header: the most a .npy preamble can take
_NPY_PREAMBLE_MAX = len(_NPY_MAGIC) + 2 + 4 + _NPY_MAX_HEADER
_DETAIL_MAX = 300
# Float dtypes only; no prefix means little-endian, as the wire format is explicit.
_MSGPACK_DTYPE = re.compile(r"([<>]?)(float16|float32|float64|f2|f4|f8)")
_MSGPACK_KEYS = frozenset({"dtype", "shape", "data"})


def media_type(header: str | None) -> str:
    """The bare, lower-case media type of a Content-Type header ('' when absent)."""
    return (header or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed ``limit`` bytes."""
    return b"".join(await read_chunks(request, limit))


async def read_chunks(request: Request, limit: int) -> list[bytes]:
    """The body as received (refused as :func:`read_body` does), for parsing in the thread
    pool rather than copying it whole on the event loop."""
    return [chunk async for chunk in _chunks(request, limit)]


async def _chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused as soon as it is known to exceed ``limit``."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"Content-Length {declared} exceeds the limit of {limit} bytes")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # chunked or lying Content-Length: stop reading now
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            if chunk:
                yield chunk
    except ClientDisconnect:  # nobody will read the answer; keep it out of the 500s
        raise MalformedBody("the client disconnected before the body was complete") from None


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "").strip()
    return int(declared) if declared.isdigit() else None


async def receive_npy(request: Request, limit: int, max_elements: int) -> np.ndarray:
    """A .npy body as an array, as :func:`decode_npy` makes it, but with each chunk copied
    into the array as it arrives rather than after the whole body: the header, in the first
    chunks, is checked and the array allocated before the data is read, so a bad header is
    refused unread and the copy overlaps the transfer instead of following it."""
    chunks = _chunks(request, limit)
    declared = _declared_length(request)
    head: list[bytes] = []
    size = 0
    async for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size >= _NPY_PREAMBLE_MAX and size != declared:  # more to come
            break
    else:  # the whole body is in hand (a small one): maybe a view of it, no copy
        return decode_npy(head, max_elements)
    fp = _ChunkFile(head)
    shape, fortran, dtype, count = _checked_npy_header(fp, max_elements)
    nbytes = count * dtype.itemsize
    if fp.tell() + nbytes > limit:
        raise BodyTooLarge(f".npy of {fp.tell() + nbytes} bytes exceeds the limit of {limit} "
                           "bytes")
    out = np.empty(count, dtype)
    flat = out.view(np.uint8)
    done = 0
    for part in fp.parts(fp.size):  # the data that came with the header
        done = _place(flat, done, part)
    async for chunk in chunks:
        done = _place(flat, done, chunk)
    if done != nbytes:
        raise MalformedBody(f".npy data is {done} bytes, header declares {nbytes}")
    return out.reshape(shape[::-1]).T if fortran else out.reshape(shape)


def _place(flat: np.ndarray, done: int, data: bytes | memoryview) -> int:
    """Copy ``data`` into ``flat`` at ``done``; the new end."""
    end = done + len(data)
    if end > flat.size:
        raise MalformedBody(f".npy data is longer than the {flat.size} bytes its header "
                            "declares")
    flat[done:end] = np.frombuffer(data, np.uint8)
    return end


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


class _ChunkFile:
    """A read-only file over a body's chunks, from which the elements are copied straight
    into their array (or viewed, in one chunk). Joining them first would cost a copy and,
    worse, fresh pages the size of the body (page faults cost more than the copy itself)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = [memoryview(c) for c in chunks if c]
        self._ends = list(accumulate(map(len, self._chunks)))
        self.size = self._ends[-1] if self._ends else 0
        self._pos = 0

    def parts(self, stop: int) -> Iterator[memoryview]:
        """The bytes from the current position to ``stop``, chunk by chunk (advancing)."""
        i = bisect_right(self._ends, self._pos)
        while self._pos < stop:
            start = self._ends[i] - len(self._chunks[i])
            part = self._chunks[i][self._pos - start: stop - start]
            self._pos += len(part)
            i += 1
            yield part

    def read(self, n: int = -1) -> bytes:
        return b"".join(self.parts(self.size if n < 0 else min(self.size, self._pos + n)))

    def rest(self, dtype: np.dtype, count: int) -> np.ndarray:
        """The ``count`` elements from the current position to the end: a read-only view
        when they lie aligned in one chunk, else copied into a new array."""
        i = bisect_right(self._ends, self._pos)
        if count and self._ends[i] == self.size:  # all in the last chunk
            chunk = self._chunks[i]
            view = np.frombuffer(chunk, dtype, count, self._pos - (self.size - len(chunk)))
            if view.flags.aligned:
                return view
        out = np.empty(count, dtype)
        flat = out.view(np.uint8)
        done = 0
        for part in self.parts(self.size):
            done = _place(flat, done, part)
        return out

    def tell(self) -> int:
        return self._pos


@functools.lru_cache(maxsize=64)
def _parse_npy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own parse of a .npy preamble (magic, version, length, header dict), cached:
    a service sees the same few shapes over and over, and the parse (ast.literal_eval)
    costs about as much as encoding a 200 KB tensor's worth of numpy calls."""
    fp = io.BytesIO(raw)
    version = np.lib.format.read_magic(fp)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(fp, max_header_size=_NPY_MAX_HEADER)


def _npy_header(fp: _ChunkFile) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy preamble at the start of ``fp``, which is
    left at the first data byte."""
    start = fp.read(len(_NPY_MAGIC) + 2)
    if start[: len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise MalformedBody("not a .npy file (bad magic)")
    version = tuple(start[len(_NPY_MAGIC):])
    if version not in ((1, 0), (2, 0)):
        raise MalformedBody(f".npy format version {version} is not supported")
    length = fp.read(2 if version == (1, 0) else 4)
    size = int.from_bytes(length, "little")
    if size > _NPY_MAX_HEADER:  # before reading it: the claim may be gigabytes
        raise MalformedBody(f".npy header of {size} bytes is over the {_NPY_MAX_HEADER} "
                            "accepted")
    try:
        return _parse_npy_header(start + length + fp.read(size))
    except Exception as exc:  # numpy reports bad headers with assorted exception types
        raise MalformedBody(f"invalid .npy header: {_short(exc)}") from None


def _checked_npy_header(fp: _ChunkFile, max_elements: int
                        ) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, element count) of the .npy preamble at the start of
    ``fp`` (left at the first data byte), refused unless it is a plain tensor of at most
    ``max_elements`` elements."""
    shape, fortran, dtype = _npy_header(fp)
    if dtype.hasobject:
        raise MalformedBody(".npy files holding Python objects (pickles) are not accepted")
    if dtype.names is not None or dtype.subdtype is not None:
        raise InvalidParameters(f"structured dtype {dtype} is not supported; "
                                "use float16, float32 or float64")
    return shape, fortran, dtype, _check_count(shape, max_elements)


def decode_npy(body: bytes | Sequence[bytes], max_elements: int) -> np.ndarray:
    """A .npy body (or its chunks) as an array, built from the checked header with no
    np.load (so never a pickle): a read-only view of the body when its data lies aligned in
    one chunk, else one copy. The header is checked before anything is allocated."""
    fp = _ChunkFile([body] if isinstance(body, bytes) else body)
    shape, fortran, dtype, count = _checked_npy_header(fp, max_elements)
    if fp.size - fp.tell() != count * dtype.itemsize:
        raise MalformedBody(f".npy data is {fp.size - fp.tell()} bytes, header declares "
                            f"{count * dtype.itemsize}")
    data = fp.rest(dtype, count)
    return data.reshape(shape[::-1]).T if fortran else data.reshape(shape)


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


def decode_msgpack_chunks(chunks: Sequence[bytes], max_elements: int) -> np.ndarray:
    """A MessagePack tensor body, as :func:`read_chunks` returns it."""
    body = b"".join(chunks)
    return decode_msgpack(body, max_elements, len(body))


# The serializers copy the elements once, straight into the response bytes (join takes
# the array's buffer): a tobytes() copy and a concatenation or packb() would each cost a
# pass over, and fresh pages for, a body of up to FEATCODEC_MAX_BODY_BYTES.
# :func:`fill_tensor` goes one step further for a result computed into an ``out=`` array
# (decompress): it lands in the response bytes themselves.


def _npy_head(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": tuple(shape)})
    return header.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    """``np.save``'s bytes (format 1.0, C order)."""
    arr = np.asarray(arr, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    return b"".join((_npy_head(arr.shape, arr.dtype), arr.reshape(-1).view(np.uint8)))


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _msgpack_head(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """Everything before the data: the map up to its "data" key, then the bin header."""
    head = msgpack.packb({"dtype": dtype.name, "shape": list(shape), "data": b""},
                         use_bin_type=True)[:-2]  # without the empty bin, b"\xc4\x00"
    return head + _bin_header(prod(shape) * dtype.itemsize)


def encode_msgpack(arr: np.ndarray) -> bytes:
    """The same map decode_msgpack reads; data is little-endian, C order."""
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return b"".join((_msgpack_head(arr.shape, arr.dtype), le.reshape(-1).view(np.uint8)))


def encode_tensor(kind: str, arr: np.ndarray) -> bytes:
    return encode_npy(arr) if kind == NPY else encode_msgpack(arr)


def fill_tensor(kind: str, shape: tuple[int, ...], dtype: np.dtype,
                fill: Callable[[np.ndarray], object]) -> bytes:
    """The body :func:`encode_tensor` would give for the array that ``fill(out)`` writes
    into ``out`` (C order, ``shape``, ``dtype``), which is a view of the body itself when
    it can be: no array of its own and no copy. If ``fill`` raises, the body is dropped
    unseen."""
    dtype = np.dtype(dtype)
    head = _npy_head(shape, dtype) if kind == NPY else _msgpack_head(shape, dtype)
    # The wire wants little-endian, and numpy's kernels take a slow path on a misaligned
    # array (a MessagePack header has any length; 3x slower measured on 8-bit decode):
    # then one copy into the body is cheaper. (A bytes object's data is 16-byte aligned on
    # 64-bit CPython, so the header's length decides; the view's own flag is checked too.)
    if dtype == dtype.newbyteorder("<") and len(head) % dtype.alignment == 0:
        body = OutBytes(len(head) + prod(shape) * dtype.itemsize)
        view = body.array[len(head):].view(dtype).reshape(shape)
        if view.flags.aligned:
            body.array[: len(head)] = np.frombuffer(head, np.uint8)
            fill(view)
            return body.finish()
    out = np.empty(shape, dtype)
    fill(out)
    return encode_tensor(kind, out)
