"""A Python client for the featcodec HTTP service (``featcodec serve``).

``Client`` and ``AsyncClient`` mirror the library: arrays in, arrays out, and
bitstreams that are byte for byte what ``codec.encode`` produces::

    from codec.client import Client

    with Client("http://127.0.0.1:8000") as c:
        blob = c.compress(x, method="mulaw", bits=4, axis=1)   # == codec.encode(...)
        y = c.decompress(blob)                                 # == codec.decode(blob)

httpx is an optional dependency (``pip install 'featcodec[client]'``): this
module imports it, ``import codec`` never does. MessagePack (same extra) is
needed only by the conv2d and layer calls. torch tensors are accepted wherever
an array is, and torch is never imported.

Retries. Every call this client makes may be retried, because none of them
can do harm when repeated: GET, PUT and DELETE are idempotent by HTTP's
definition (PUT stores the same layer again, a repeated DELETE finds nothing
left to delete), and the POSTs -- compress, decompress, inspect, conv2d and a
stored layer's conv2d -- are pure functions of their body and query that change
no server state. A call is retried only when retrying can help: on connection
errors (refused, reset, closed without an answer: the request did not run, or
its answer was lost) and on 502, 503 and 504 (a proxy's or the service's own
"not now"), with exponential backoff (``backoff * 2**n``, at most
``backoff_max``, with a little jitter) or the server's ``Retry-After`` when it
gives one. Timeouts are not retried: the timeout is the caller's budget, and a
slow request retried would only spend it several times over. Every other error
status is final and raised at once as a typed exception.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import numpy as np

from . import api
from .errors import FormatError, MissingExtraError
from .qtensor import QTensor

if TYPE_CHECKING:
    from typing_extensions import Self

try:
    import httpx
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("client", "httpx") from _exc

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientError",
    "ConflictError",
    "InvalidParametersError",
    "MalformedBitstreamError",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RequestTimeoutError",
    "ServerError",
    "ServiceConnectionError",
    "ServiceError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
]

T = TypeVar("T")

PROBLEM_JSON = "application/problem+json"
NPY = "application/x-npy"
MSGPACK = "application/msgpack"
OCTET_STREAM = "application/octet-stream"
TYPE_PREFIX = "urn:featcodec:problem:"
RETRY_STATUSES = frozenset({502, 503, 504})
# Failures where the request never reached the server, or its answer was lost.
_RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
    httpx.RemoteProtocolError, httpx.PoolTimeout,
)
_DETAIL_MAX = 500


# --------------------------------------------------------------------------- errors

class ServiceError(Exception):
    """An error answer from the service (an RFC 9457 problem document), or no answer.

    ``status_code`` is the HTTP status (``None`` for connection failures);
    ``title``, ``detail``, ``type`` and ``instance`` come from the problem
    document, ``problem`` is the whole document (extension members included).
    """

    def __init__(self, status_code: int | None, title: str, detail: str,
                 type: str = "about:blank", instance: str | None = None,
                 problem: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.problem: dict[str, Any] = dict(problem or {})
        self.headers: dict[str, str] = dict(headers or {})
        prefix = f"{status_code} {title}" if status_code is not None else title
        super().__init__(f"{prefix}: {detail}" if detail else prefix)


class ServiceConnectionError(ServiceError, ConnectionError):
    """The service could not be reached (after the retries), or the request timed out."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, "Service unreachable", detail)


class ClientError(ServiceError):
    """A 4xx answer: the request was wrong; repeating it will not help."""


class ServerError(ServiceError):
    """A 5xx answer: the service failed (502/503/504 only after the retries)."""


class BadRequestError(ClientError, ValueError):
    """400: a body the service could not read."""


class AuthenticationError(ClientError):
    """401: no API key, or not one the server knows (``api_key=``)."""


class PermissionDeniedError(ClientError):
    """403: the key (or the server's configuration) does not allow this call."""


class RequestTimeoutError(ClientError):
    """408: the server gave up waiting for the request body."""


class MalformedBitstreamError(BadRequestError, FormatError):
    """400 malformed-bitstream: what ``codec.FormatError`` is locally (and a subclass of it)."""


class NotFoundError(ClientError, LookupError):
    """404: no such path, or no such stored layer."""


class NotAcceptableError(ClientError):
    """406: the service cannot answer in the asked-for media type."""


class ConflictError(ClientError):
    """409: the request conflicts with the service's state."""


class PayloadTooLargeError(ClientError):
    """413: the body or the tensor is over the service's limits."""


class UnsupportedMediaTypeError(ClientError):
    """415: a Content-Type the endpoint does not read."""


class InvalidParametersError(ClientError, ValueError):
    """422: bad arguments or data (what the library raises as ValueError/TypeError)."""


class ServiceUnavailableError(ServerError):
    """503: the service is starting, overloaded or out of memory (retried first)."""


_BY_TYPE: dict[str, type[ServiceError]] = {
    TYPE_PREFIX + "malformed-bitstream": MalformedBitstreamError,
    TYPE_PREFIX + "invalid-parameters": InvalidParametersError,
}
_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 406: NotAcceptableError, 408: RequestTimeoutError, 409: ConflictError,
    413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: InvalidParametersError,
    503: ServiceUnavailableError,
}


def _error_from(response: httpx.Response) -> ServiceError:
    """The typed exception for an error response (problem document or not)."""
    status = response.status_code
    problem: dict[str, Any] = {}
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind in (PROBLEM_JSON, "application/json"):
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if isinstance(body, dict):
            problem = body
    title = str(problem.get("title") or response.reason_phrase or "Error")
    if "detail" in problem:
        detail = str(problem["detail"])
    else:
        detail = response.text[:_DETAIL_MAX].strip() if response.content else ""
    type_ = str(problem.get("type") or "about:blank")
    instance = problem.get("instance")
    cls = _BY_TYPE.get(type_) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ClientError if status >= 400 else ServiceError
    return cls(status, title, detail, type_, instance if isinstance(instance, str) else None,
               problem, response.headers)


# --------------------------------------------------------------------------- payloads

def _to_numpy(x: Any) -> np.ndarray:
    """An ndarray from an array-like or a torch tensor (torch is never imported)."""
    if type(x).__module__.startswith("torch"):
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot be sent; use a float dtype")
    return arr


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as exc:
        raise MissingExtraError("client", "msgpack") from exc
    return msgpack


def _tensor_map(x: Any, allowed: Sequence[str], name: str) -> dict[str, Any]:
    """The MessagePack tensor map ``{dtype, shape, data}`` (little-endian, C order)."""
    arr = _to_numpy(x)
    if arr.dtype.name not in allowed:
        if arr.dtype.kind == "f" and "float32" in allowed:
            arr = arr.astype(np.float32)
        else:
            raise TypeError(f"{name} must be {' or '.join(allowed)}, not {arr.dtype}")
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": le.tobytes()}


def _tensor_from_map(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ServiceError(None, "Unexpected response", "not a MessagePack tensor map")
    dtype = np.dtype(obj["dtype"])
    if dtype.byteorder == "=":
        dtype = dtype.newbyteorder("<")
    arr = np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"])
    return arr.astype(arr.dtype.newbyteorder("="))  # a native, writable copy


def _bitstream(x: Any, encode_options: Mapping[str, Any] | None) -> bytes:
    """A bitstream argument: bytes as they are, a QTensor serialized, an array encoded."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, QTensor):
        return api.encode_qtensor(x)
    if encode_options is None:
        encode_options = {}
    return api.encode(_to_numpy(x), **encode_options)


def _bytes_arg(blob: Any) -> bytes:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return bytes(blob)
    raise TypeError(f"expected a bitstream (bytes), not {type(blob).__name__}")


def _query_value(name: str, value: Any) -> str:
    """A method option as the service's query syntax (see docs/SERVICE.md)."""
    if type(value).__module__.startswith("torch"):
        value = _to_numpy(value)
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (np.ndarray, list, tuple)):
        flat = np.asarray(value).ravel().tolist()
        if not flat:
            raise ValueError(f"{name}: an empty list cannot be sent")
        return ",".join(_number(name, v) for v in flat)
    if isinstance(value, str):
        return value
    return _number(name, value)


def _number(name: str, v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # shortest text that parses back to the same double
    raise TypeError(f"{name}: expected a number or a list of numbers, got {type(v).__name__}")


def _conv_attrs(stride: Any, padding: Any, dilation: Any, groups: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if value is None:
            continue
        out[key] = [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)
    if groups is not None:
        out["groups"] = int(groups)
    return out


def _parse_npy(response: httpx.Response) -> np.ndarray:
    arr = np.load(io.BytesIO(response.content), allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        raise ServiceError(None, "Unexpected response", "not a single .npy array")
    return arr


def _parse_tensor(response: httpx.Response) -> np.ndarray:
    kind = _media_type(response)
    if kind in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
        return _tensor_from_map(_msgpack().unpackb(response.content, raw=False))
    return _parse_npy(response)


def _parse_tensor_or_bitstream(response: httpx.Response) -> np.ndarray | bytes:
    if _media_type(response) == OCTET_STREAM:
        return response.content
    return _parse_tensor(response)


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";", 1)[0].strip().lower()


def _parse_json(response: httpx.Response) -> Any:
    return response.json()


def _parse_none(response: httpx.Response) -> None:
    return None


# --------------------------------------------------------------------------- requests

@dataclass
class _Call:
    """One HTTP request and how to read its answer; shared by both clients."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    missing_ok_after_retry: bool = False  # DELETE: a 404 after a lost answer means done


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Base:
    """Configuration, request building and the retry policy (no I/O)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 30.0, *, retries: int = 3,
                 backoff: float = 0.2, backoff_max: float = 8.0,
                 max_retry_after: float = 60.0, headers: Mapping[str, str] | None = None
                 ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.timeout = timeout
        self._headers = {"User-Agent": f"featcodec-client/{_version()}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(headers or {})

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``; None: do not retry."""
        if attempt >= self.retries:
            return None
        # up to 10% jitter spreads out a herd of clients retrying together
        delay = min(self.backoff_max, self.backoff * 2.0 ** attempt * (1 + 0.1 * random.random()))
        if response is not None:
            asked = _retry_after(response)
            if asked is not None:
                if asked > self.max_retry_after:
                    return None  # the server wants longer than we are willing to block
                delay = asked
        return delay

    @staticmethod
    def _finish(call: _Call, response: httpx.Response, lost_answer: bool) -> Any:
        if response.status_code == 404 and call.missing_ok_after_retry and lost_answer:
            return call.parse(response)  # the first DELETE went through; its answer was lost
        if response.status_code >= 400:
            raise _error_from(response)
        return call.parse(response)

    # ---- request builders: one per endpoint

    def _compress(self, x: Any, method: str, bits: int, axis: int | None,
                  options: Mapping[str, Any]) -> _Call:
        arr = _to_numpy(x)
        params = {"method": str(method), "bits": _number("bits", bits)}
        if axis is not None:
            params["axis"] = _number("axis", axis)
        for name, value in options.items():
            if value is not None:
                params[name] = _query_value(name, value)
        return _Call("POST", "/v1/compress", lambda r: r.content, params, _npy_bytes(arr),
                     {"Content-Type": NPY})

    def _decompress(self, blob: Any) -> _Call:
        return _Call("POST", "/v1/decompress", _parse_tensor, content=_bytes_arg(blob),
                     headers={"Content-Type": OCTET_STREAM, "Accept": NPY})

    def _inspect(self, blob: Any) -> _Call:
        return _Call("POST", "/v1/inspect", _parse_json, content=_bytes_arg(blob),
                     headers={"Content-Type": OCTET_STREAM, "Accept": "application/json"})

    def _codecs(self) -> _Call:
        return _Call("GET", "/v1/codecs", lambda r: r.json()["methods"])

    def _conv2d(self, x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
                groups: Any, relu: bool | None, out_scale: float | None,
                out_zero_point: int | None, x_encode: Mapping[str, Any] | None,
                accept: str) -> _Call:
        body: dict[str, Any] = {"x": _bitstream(x, x_encode)}
        if isinstance(w, (bytes, bytearray, memoryview, QTensor)):
            body["w"] = _bitstream(w, None)
        else:
            body["w"] = _tensor_map(w, ("float32",), "w")
        if bias is not None:
            body["bias"] = _tensor_map(bias, ("float32", "int32"), "bias")
        body.update(_conv_attrs(stride, padding, dilation, groups))
        if relu is not None:
            body["relu"] = bool(relu)
        if out_scale is not None:
            body["out_scale"] = float(out_scale)
        if out_zero_point is not None:
            body["out_zero_point"] = int(out_zero_point)
        content = _msgpack().packb(body, use_bin_type=True)
        return _Call("POST", "/v1/conv2d", _parse_tensor_or_bitstream, content=content,
                     headers={"Content-Type": MSGPACK, "Accept": _accept(accept)})

    def _put_layer(self, name: str, w: Any, bias: Any, stride: Any, padding: Any,
                   dilation: Any, groups: Any) -> _Call:
        body: dict[str, Any] = {}
        if isinstance(w, (bytes, bytearray, memoryview, QTensor)):
            body["w"] = _bitstream(w, None)
        else:
            body["w"] = _tensor_map(w, ("float32",), "w")
        if bias is not None:
            body["bias"] = _tensor_map(bias, ("float32", "int32"), "bias")
        body.update(_conv_attrs(stride, padding, dilation, groups))
        content = _msgpack().packb(body, use_bin_type=True)
        return _Call("PUT", _layer_path(name), _parse_json, content=content,
                     headers={"Content-Type": MSGPACK, "Accept": "application/json"})

    def _get_layer(self, name: str) -> _Call:
        return _Call("GET", _layer_path(name), _parse_json)

    def _list_layers(self) -> _Call:
        return _Call("GET", "/v1/layers", lambda r: r.json()["layers"])

    def _delete_layer(self, name: str) -> _Call:
        return _Call("DELETE", _layer_path(name), _parse_none, missing_ok_after_retry=True)

    def _layer_conv2d(self, name: str, x: Any, relu: bool | None, out_scale: float | None,
                      out_zero_point: int | None, x_encode: Mapping[str, Any] | None,
                      accept: str) -> _Call:
        params: dict[str, str] = {}
        if relu is not None:
            params["relu"] = "true" if relu else "false"
        if out_scale is not None:
            params["out_scale"] = _number("out_scale", float(out_scale))
        if out_zero_point is not None:
            params["out_zero_point"] = _number("out_zero_point", int(out_zero_point))
        return _Call("POST", _layer_path(name) + "/conv2d", _parse_tensor_or_bitstream, params,
                     _bitstream(x, x_encode),
                     {"Content-Type": OCTET_STREAM, "Accept": _accept(accept)})


def _accept(kind: str) -> str:
    if kind == "npy":
        return f"{OCTET_STREAM}, {NPY}"
    if kind == "msgpack":
        return f"{OCTET_STREAM}, {MSGPACK}"
    raise ValueError(f"accept must be 'npy' or 'msgpack', not {kind!r}")


def _layer_path(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("a layer name must be a non-empty string")
    return "/v1/layers/" + quote(name, safe="")


def _version() -> str:
    from . import __version__
    return __version__


def _missing(missing_ok: bool, exc: NotFoundError) -> None:
    if not missing_ok:
        raise exc from None


# --------------------------------------------------------------------------- clients

class Client(_Base):
    """Blocking client; one pooled ``httpx.Client`` (kept-alive connections) per instance.

    ``timeout`` (seconds, or an ``httpx.Timeout``) applies to each attempt;
    ``retries`` extra attempts on connection errors and 502/503/504;
    ``transport`` replaces the network (e.g. ``httpx.MockTransport``) in tests.
    """

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 30.0, *, retries: int = 3,
                 backoff: float = 0.2, backoff_max: float = 8.0, max_retry_after: float = 60.0,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, max_retry_after=max_retry_after,
                         headers=headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers,
                                  timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call) -> Any:
        attempt = 0
        lost_answer = False
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params,
                                              content=call.content, headers=call.headers)
            except _RETRY_EXCEPTIONS as exc:
                delay = self._delay(attempt, None)
                if delay is None:
                    raise ServiceConnectionError(f"{call.method} {self.base_url}{call.path}: "
                                                 f"{type(exc).__name__}: {exc}") from exc
                lost_answer = lost_answer or not isinstance(exc, httpx.ConnectError)
            except httpx.TimeoutException as exc:
                raise ServiceConnectionError(f"{call.method} {self.base_url}{call.path}: "
                                             f"timed out ({type(exc).__name__})") from exc
            else:
                delay = (self._delay(attempt, response)
                         if response.status_code in RETRY_STATUSES else None)
                if delay is None:
                    return self._finish(call, response, lost_answer)
                response.close()
            time.sleep(delay)
            attempt += 1

    # ---- codec endpoints

    def compress(self, x: Any, method: str = "linear", bits: int = 8, axis: int | None = None,
                 **options: Any) -> bytes:
        """The bitstream of ``x``, byte for byte ``codec.encode(x, method, bits, axis, **opts)``.

        Options take the library's values: numbers, lists or arrays (per channel),
        booleans, text."""
        result: bytes = self._run(self._compress(x, method, bits, axis, options))
        return result

    def decompress(self, blob: bytes | bytearray | memoryview) -> np.ndarray:
        """The tensor of a bitstream (original shape and dtype), as ``codec.decode``."""
        result: np.ndarray = self._run(self._decompress(blob))
        return result

    def inspect(self, blob: bytes | bytearray | memoryview) -> dict[str, Any]:
        """A bitstream's header as a dict, as ``codec.inspect``."""
        result: dict[str, Any] = self._run(self._inspect(blob))
        return result

    def codecs(self) -> list[dict[str, Any]]:
        """The server's methods, as ``codec.methods()``."""
        result: list[dict[str, Any]] = self._run(self._codecs())
        return result

    def conv2d(self, x: Any, w: Any, bias: Any = None, *, stride: Any = None,
               padding: Any = None, dilation: Any = None, groups: int | None = None,
               relu: bool | None = None, out_scale: float | None = None,
               out_zero_point: int | None = None, x_encode: Mapping[str, Any] | None = None,
               accept: str = "npy") -> np.ndarray | bytes:
        """Convolve quantized activations on the server (``POST /v1/conv2d``).

        ``x``: a bitstream (bytes), a QTensor, or an array encoded here with
        ``codec.encode(x, **x_encode)`` (default linear, 8 bits, per tensor).
        ``w``: float32 OIHW weights or a bitstream; ``bias``: float32 or int32.
        Attributes left ``None`` take the server's defaults. Returns the float32
        NCHW output, or with ``out_scale`` the requantized output's bitstream.
        """
        result: np.ndarray | bytes = self._run(self._conv2d(
            x, w, bias, stride, padding, dilation, groups, relu, out_scale, out_zero_point,
            x_encode, accept))
        return result

    # ---- stored layers

    def put_layer(self, name: str, w: Any, bias: Any = None, *, stride: Any = None,
                  padding: Any = None, dilation: Any = None, groups: int | None = None
                  ) -> dict[str, Any]:
        """Store (or replace) a convolution layer under ``name``; returns its description."""
        result: dict[str, Any] = self._run(self._put_layer(name, w, bias, stride, padding,
                                                           dilation, groups))
        return result

    def get_layer(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self._get_layer(name))
        return result

    def list_layers(self) -> list[Any]:
        result: list[Any] = self._run(self._list_layers())
        return result

    def delete_layer(self, name: str, missing_ok: bool = False) -> None:
        """Delete a stored layer; ``NotFoundError`` if there is none (unless ``missing_ok``)."""
        try:
            self._run(self._delete_layer(name))
        except NotFoundError as exc:
            _missing(missing_ok, exc)

    def layer_conv2d(self, name: str, x: Any, *, relu: bool | None = None,
                     out_scale: float | None = None, out_zero_point: int | None = None,
                     x_encode: Mapping[str, Any] | None = None, accept: str = "npy"
                     ) -> np.ndarray | bytes:
        """Run the stored layer ``name`` on quantized activations ``x`` (see ``conv2d``)."""
        result: np.ndarray | bytes = self._run(self._layer_conv2d(
            name, x, relu, out_scale, out_zero_point, x_encode, accept))
        return result


class AsyncClient(_Base):
    """The same calls as ``Client``, as coroutines, over one pooled ``httpx.AsyncClient``."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 30.0, *, retries: int = 3,
                 backoff: float = 0.2, backoff_max: float = 8.0, max_retry_after: float = 60.0,
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, max_retry_after=max_retry_after,
                         headers=headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                       timeout=timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call) -> Any:
        attempt = 0
        lost_answer = False
        while True:
            try:
                response = await self._http.request(call.method, call.path, params=call.params,
                                                    content=call.content, headers=call.headers)
            except _RETRY_EXCEPTIONS as exc:
                delay = self._delay(attempt, None)
                if delay is None:
                    raise ServiceConnectionError(f"{call.method} {self.base_url}{call.path}: "
                                                 f"{type(exc).__name__}: {exc}") from exc
                lost_answer = lost_answer or not isinstance(exc, httpx.ConnectError)
            except httpx.TimeoutException as exc:
                raise ServiceConnectionError(f"{call.method} {self.base_url}{call.path}: "
                                             f"timed out ({type(exc).__name__})") from exc
            else:
                delay = (self._delay(attempt, response)
                         if response.status_code in RETRY_STATUSES else None)
                if delay is None:
                    return self._finish(call, response, lost_answer)
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def compress(self, x: Any, method: str = "linear", bits: int = 8,
                       axis: int | None = None, **options: Any) -> bytes:
        result: bytes = await self._run(self._compress(x, method, bits, axis, options))
        return result

    async def decompress(self, blob: bytes | bytearray | memoryview) -> np.ndarray:
        result: np.ndarray = await self._run(self._decompress(blob))
        return result

    async def inspect(self, blob: bytes | bytearray | memoryview) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self._inspect(blob))
        return result

    async def codecs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._run(self._codecs())
        return result

    async def conv2d(self, x: Any, w: Any, bias: Any = None, *, stride: Any = None,
                     padding: Any = None, dilation: Any = None, groups: int | None = None,
                     relu: bool | None = None, out_scale: float | None = None,
                     out_zero_point: int | None = None,
                     x_encode: Mapping[str, Any] | None = None, accept: str = "npy"
                     ) -> np.ndarray | bytes:
        result: np.ndarray | bytes = await self._run(self._conv2d(
            x, w, bias, stride, padding, dilation, groups, relu, out_scale, out_zero_point,
            x_encode, accept))
        return result

    async def put_layer(self, name: str, w: Any, bias: Any = None, *, stride: Any = None,
                        padding: Any = None, dilation: Any = None, groups: int | None = None
                        ) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self._put_layer(name, w, bias, stride,
                                                                 padding, dilation, groups))
        return result

    async def get_layer(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self._get_layer(name))
        return result

    async def list_layers(self) -> list[Any]:
        result: list[Any] = await self._run(self._list_layers())
        return result

    async def delete_layer(self, name: str, missing_ok: bool = False) -> None:
        try:
            await self._run(self._delete_layer(name))
        except NotFoundError as exc:
            _missing(missing_ok, exc)

    async def layer_conv2d(self, name: str, x: Any, *, relu: bool | None = None,
                           out_scale: float | None = None, out_zero_point: int | None = None,
                           x_encode: Mapping[str, Any] | None = None, accept: str = "npy"
                           ) -> np.ndarray | bytes:
        result: np.ndarray | bytes = await self._run(self._layer_conv2d(
            name, x, relu, out_scale, out_zero_point, x_encode, accept))
        return result
