"""codec.client: every codec call against a real server, byte symmetry with the library,
problem documents as typed exceptions, and the retry policy (MockTransport and a stub
HTTP server on loopback)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest

import codec
from codec import client as cc
from codec.client import AsyncClient, Client

from conftest import ROOT, Server, free_port

pytestmark = pytest.mark.integration

METHODS = [m["name"] for m in codec.methods()]
OPTIONS: list[tuple[str, int, int | None, dict[str, Any]]] = [
    ("linear", 8, None, {}),
    ("linear", 3, 1, {"signed": True}),
    ("linear", 8, 1, {"scale": np.array([0.05, 0.1, 0.2], np.float32), "zero_point": 3}),
    ("symmetric", 4, None, {"signed": True, "restricted": True}),
    ("symmetric", 8, None, {"scale": np.float32(0.1)}),
    ("mulaw", 4, 1, {"mu": 100}),
    ("mulaw", 8, None, {"mu": 255, "max_abs": 2.5}),
    ("log", 5, -3, {}),
    ("log", 6, None, {"beta": 1.5, "max_abs": 3.0}),
    ("exp", 4, 1, {"lam_fit": "equiprobable"}),
    ("exp", 7, None, {"lam": [0.5], "max_abs": 3.0}),
]


def tensor(dtype: Any = np.float32, shape: tuple[int, ...] = (2, 3, 4, 5),
           seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture()
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, api_key="secret", timeout=30) as c:
        yield c


# --------------------------------------------------------------------------- import

def test_import_codec_does_not_import_httpx() -> None:
    code = ("import sys, codec; codec.encode([0.5]); "
            "assert 'httpx' not in sys.modules and 'msgpack' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('httpx', 'msgpack'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- codec calls

@pytest.mark.parametrize(("method", "bits", "axis", "options"), OPTIONS,
                         ids=[f"{m}-{b}-{a}-{'+'.join(o) or 'fit'}" for m, b, a, o in OPTIONS])
def test_compress_is_byte_identical_to_local_encode(client: Client, method: str, bits: int,
                                                    axis: int | None,
                                                    options: dict[str, Any]) -> None:
    x = tensor()
    remote = client.compress(x, method, bits, axis, **options)
    assert remote == codec.encode(x, method, bits, axis, **options)


@pytest.mark.parametrize("method", METHODS)
def test_local_and_remote_paths_are_symmetric(client: Client, method: str) -> None:
    """Encode here and decode there, or the other way round: the same bytes and values."""
    x = np.maximum(tensor(shape=(1, 4, 6, 6)), 0)
    local_blob = codec.encode(x, method, 4, axis=1)
    remote_blob = client.compress(x, method, 4, axis=1)
    assert local_blob == remote_blob
    np.testing.assert_array_equal(client.decompress(local_blob), codec.decode(remote_blob))
    assert client.inspect(remote_blob) == codec.inspect(local_blob)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
def test_decompress_restores_shape_and_dtype(client: Client, dtype: Any) -> None:
    x = tensor(dtype, (3, 1, 2))
    blob = client.compress(x, "linear", 8)
    assert blob == codec.encode(x, "linear", 8)
    y = client.decompress(blob)
    expected = codec.decode(blob)
    assert y.dtype == expected.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, expected)
    y[...] = 0  # a writable array of our own


def test_fortran_order_and_scalars(client: Client) -> None:
    x = np.asfortranarray(tensor(shape=(4, 5)))
    assert client.compress(x) == codec.encode(x)
    s = np.float32(1.25)
    assert client.compress(s) == codec.encode(s)
    assert client.decompress(codec.encode(s)).shape == ()
    assert client.compress([[0.5, 1.5]]) == codec.encode([[0.5, 1.5]])


def test_inspect_and_codecs(client: Client) -> None:
    blob = codec.encode(tensor(), "mulaw", 4, axis=1)
    assert client.inspect(blob) == codec.inspect(blob)
    assert client.codecs() == json.loads(json.dumps(codec.methods()))
    assert client.inspect(bytearray(blob)) == codec.inspect(blob)


class FakeTorchTensor:
    """Quacks like a torch tensor: the client must use .detach().cpu().numpy()."""

    __module__ = "torch"

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.calls: list[str] = []
        self.dtype = "torch.float32"

    def detach(self) -> FakeTorchTensor:
        self.calls.append("detach")
        return self

    def cpu(self) -> FakeTorchTensor:
        self.calls.append("cpu")
        return self

    def numpy(self) -> np.ndarray:
        self.calls.append("numpy")
        return self.arr

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:  # pragma: no cover
        raise AssertionError("the client should not fall back to __array__")


def test_torch_tensors_are_accepted(client: Client) -> None:
    x = tensor()
    t = FakeTorchTensor(x)
    assert client.compress(t, "log", 4) == codec.encode(x, "log", 4)
    assert t.calls == ["detach", "cpu", "numpy"]
    scale = FakeTorchTensor(np.array([0.1, 0.2, 0.3], np.float32))
    assert client.compress(x, "linear", 8, 1, scale=scale) == \
        codec.encode(x, "linear", 8, 1, scale=scale.arr)


def test_api_key_is_sent_as_bearer_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"methods": []})

    with Client("http://test", api_key="s3cret", transport=httpx.MockTransport(handler)) as c:
        c.codecs()
    with Client("http://test", transport=httpx.MockTransport(handler)) as c:
        c.codecs()
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in seen[1].headers
    assert seen[0].headers["user-agent"].startswith("featcodec-client/")


def test_api_key_against_a_server_that_requires_one(api_key_server: Server) -> None:
    x = tensor()
    with Client(api_key_server.url, api_key="second-key") as c:
        assert c.compress(x) == codec.encode(x)
    for key in (None, "wrong-key"):
        with Client(api_key_server.url, api_key=key) as c, \
                pytest.raises(cc.AuthenticationError) as info:
            c.compress(x)
        assert info.value.status_code == 401 and info.value.title == "Unauthorized"
        assert info.value.headers["www-authenticate"].startswith("Bearer")


# --------------------------------------------------------------------------- errors

def test_corrupt_stream_raises_typed_error(client: Client) -> None:
    blob = codec.encode(tensor())
    with pytest.raises(cc.MalformedBitstreamError) as info:
        client.decompress(blob[:-1])
    err = info.value
    assert isinstance(err, codec.FormatError)  # the library's own error type, remotely
    assert isinstance(err, (cc.BadRequestError, cc.ClientError, cc.ServiceError))
    assert err.status_code == 400
    assert err.type == "urn:featcodec:problem:malformed-bitstream"
    assert err.title == "Malformed bitstream"
    assert "truncated" in err.detail
    assert err.instance == "/v1/decompress"
    with pytest.raises(cc.MalformedBitstreamError):
        client.inspect(b"not a stream")


def test_invalid_parameters_raise_typed_error(client: Client) -> None:
    with pytest.raises(cc.InvalidParametersError) as info:
        client.compress(tensor(), "nope")
    assert info.value.status_code == 422 and isinstance(info.value, ValueError)
    assert "unknown method" in info.value.detail
    with pytest.raises(cc.InvalidParametersError, match="bits"):
        client.compress(tensor(), "linear", 9)
    with pytest.raises(cc.InvalidParametersError, match="NaN"):
        client.compress(np.array([1.0, np.nan], np.float32))
    with pytest.raises(cc.InvalidParametersError):
        client.compress(np.arange(4))  # integers: the library refuses them too
    with pytest.raises(cc.InvalidParametersError) as info:
        client.compress(tensor(), "linear", 8, bogus=1)
    assert "bogus" in info.value.detail


def test_too_large_raises_typed_error(small_server: Server) -> None:
    with Client(small_server.url) as c, pytest.raises(cc.PayloadTooLargeError) as info:
        c.compress(np.zeros(5000, np.float32))
    assert info.value.status_code == 413
    assert info.value.type == "urn:featcodec:problem:body-too-large"


def test_arguments_refused_before_sending(client: Client) -> None:
    with pytest.raises(TypeError):
        client.decompress(tensor())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.compress(np.array([object()]))


@pytest.mark.parametrize(("status", "body", "ctype", "cls"), [
    (404, {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no layer x"},
     "application/problem+json", cc.NotFoundError),
    (403, {"title": "Forbidden", "status": 403, "detail": "layer writes are disabled"},
     "application/problem+json", cc.PermissionDeniedError),
    (408, {"title": "Request timeout", "status": 408, "detail": "d"},
     "application/problem+json", cc.RequestTimeoutError),
    (406, {"title": "Not acceptable", "status": 406, "detail": "d",
           "type": "urn:featcodec:problem:not-acceptable"}, "application/problem+json",
     cc.NotAcceptableError),
    (409, {"title": "Conflict", "status": 409, "detail": "d"}, "application/problem+json",
     cc.ConflictError),
    (415, {"title": "Unsupported", "status": 415, "detail": "d"}, "application/problem+json",
     cc.UnsupportedMediaTypeError),
    (418, {"title": "Teapot", "status": 418, "detail": "d"}, "application/problem+json",
     cc.ClientError),
    (500, {"type": "about:blank", "title": "Internal Server Error", "status": 500,
           "detail": "the server failed"}, "application/problem+json", cc.ServerError),
    (501, "<html>nope</html>", "text/html", cc.ServerError),
])
def test_problem_documents_map_to_exception_classes(status: int, body: Any, ctype: str,
                                                    cls: type[cc.ServiceError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
        return httpx.Response(status, content=content, headers={"content-type": ctype})

    with Client("http://test", transport=httpx.MockTransport(handler)) as c, \
            pytest.raises(cls) as info:
        c.codecs()
    err = info.value
    assert type(err) is cls and err.status_code == status
    if isinstance(body, dict):
        assert err.title == body["title"] and err.detail == body["detail"]
        assert err.type == body.get("type", "about:blank")
        assert err.problem == body
    else:
        assert err.type == "about:blank" and "nope" in err.detail
        assert err.title == "Not Implemented"


# --------------------------------------------------------------------------- retries

class Script:
    """A MockTransport handler answering from a list of responses or exceptions."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        response: httpx.Response = step(request) if callable(step) else step
        return response


def ok_codecs(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"methods": [{"name": "linear"}]})


def unavailable(retry_after: str | None = None, status: int = 503) -> httpx.Response:
    headers = {"content-type": "application/problem+json"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return httpx.Response(status, headers=headers, json={
        "type": "urn:featcodec:problem:service-unavailable", "title": "Service unavailable",
        "status": status, "detail": "try later"})


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    delays: list[float] = []
    monkeypatch.setattr(cc.time, "sleep", delays.append)
    return delays


def mock_client(script: Script, **kwargs: Any) -> Client:
    return Client("http://test", transport=httpx.MockTransport(script), **kwargs)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_retries_gateway_statuses_with_exponential_backoff(status: int,
                                                           sleeps: list[float]) -> None:
    script = Script(unavailable(status=status), unavailable(status=status), ok_codecs)
    with mock_client(script, backoff=0.5) as c:
        assert c.codecs() == [{"name": "linear"}]
    assert len(script.requests) == 3
    assert 0.5 <= sleeps[0] <= 0.55 and 1.0 <= sleeps[1] <= 1.1


def test_retry_after_is_honoured(sleeps: list[float]) -> None:
    when = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past: retry at once
    script = Script(unavailable("3"), unavailable(when), ok_codecs)
    with mock_client(script, backoff=0.01) as c:
        c.codecs()
    assert sleeps == [3.0, 0.0]


def test_gives_up_after_the_retries(sleeps: list[float]) -> None:
    script = Script(*[unavailable() for _ in range(4)])
    with mock_client(script, retries=3, backoff=0.1, backoff_max=0.25) as c, \
            pytest.raises(cc.ServiceUnavailableError) as info:
        c.codecs()
    assert len(script.requests) == 4 and info.value.status_code == 503
    assert len(sleeps) == 3 and sleeps[2] == 0.25  # capped by backoff_max
    assert info.value.detail == "try later"


def test_retry_after_beyond_the_limit_is_not_waited_for(sleeps: list[float]) -> None:
    script = Script(unavailable("3600"), ok_codecs)
    with mock_client(script, max_retry_after=60) as c, pytest.raises(cc.ServiceUnavailableError):
        c.codecs()
    assert sleeps == [] and len(script.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 413, 422, 500])
def test_other_errors_are_not_retried(status: int, sleeps: list[float]) -> None:
    script = Script(httpx.Response(status, json={"title": "t", "status": status, "detail": "d"},
                                   headers={"content-type": "application/problem+json"}),
                    ok_codecs)
    with mock_client(script) as c, pytest.raises(cc.ServiceError) as info:
        c.codecs()
    assert info.value.status_code == status and len(script.requests) == 1 and sleeps == []


def test_connection_errors_are_retried(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.RemoteProtocolError("closed"),
                    ok_codecs)
    with mock_client(script) as c:
        assert c.codecs() == [{"name": "linear"}]
    assert len(script.requests) == 3 and len(sleeps) == 2


def test_unreachable_server_raises_connection_error(sleeps: list[float]) -> None:
    script = Script(*[httpx.ConnectError("refused") for _ in range(3)])
    with mock_client(script, retries=2) as c, pytest.raises(cc.ServiceConnectionError) as info:
        c.compress(tensor())
    assert len(script.requests) == 3
    assert info.value.status_code is None and isinstance(info.value, ConnectionError)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_timeouts_are_not_retried(sleeps: list[float]) -> None:
    script = Script(httpx.ReadTimeout("slow"), ok_codecs)
    with mock_client(script) as c, pytest.raises(cc.ServiceConnectionError, match="timed out"):
        c.codecs()
    assert len(script.requests) == 1 and sleeps == []


def test_retried_requests_resend_the_same_body(sleeps: list[float]) -> None:
    x = tensor()
    blob = codec.encode(x)
    script = Script(unavailable("0"), httpx.Response(
        200, content=blob, headers={"content-type": "application/octet-stream"}))
    with mock_client(script) as c:
        assert c.compress(x, "linear", 8) == blob
    first, second = script.requests
    assert first.content == second.content and first.url == second.url
    assert dict(first.url.params) == {"method": "linear", "bits": "8"}


def test_delete_whose_answer_was_lost_is_done(sleeps: list[float]) -> None:
    """A DELETE retried after a lost answer finds nothing: that is success, not 404."""
    gone = httpx.Response(404, json={"title": "Not Found", "status": 404, "detail": "no"},
                          headers={"content-type": "application/problem+json"})
    script = Script(httpx.ReadError("reset"), gone)
    with mock_client(script) as c:
        c.delete_layer("l1")
    assert [r.method for r in script.requests] == ["DELETE", "DELETE"]
    with mock_client(Script(gone)) as c, pytest.raises(cc.NotFoundError):
        c.delete_layer("l1")
    with mock_client(Script(gone)) as c:
        c.delete_layer("l1", missing_ok=True)


class StubHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 stub: 503 (Retry-After: 0) for the first ``fail`` requests."""

    protocol_version = "HTTP/1.1"
    server: StubServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            self.server.requests += 1
            failing = self.server.requests <= self.server.fail
        if failing:
            payload = json.dumps({"type": "urn:featcodec:problem:service-unavailable",
                                  "title": "Service unavailable", "status": 503,
                                  "detail": "warming up"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Retry-After", "0")
        else:
            payload = json.dumps(codec.inspect(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fail: int) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.fail, self.requests, self.connections = fail, 0, 0
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture()
def stub() -> Iterator[Callable[[int], StubServer]]:
    servers: list[StubServer] = []

    def start(fail: int) -> StubServer:
        s = StubServer(fail)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_retries_a_real_503_and_reuses_one_connection(stub: Callable[[int], StubServer]
                                                      ) -> None:
    s = stub(2)
    blob = codec.encode(tensor())
    with Client(s.url, backoff=0.01) as c:
        assert c.inspect(blob) == codec.inspect(blob)  # after two 503s
        for _ in range(5):
            c.inspect(blob)
    assert s.requests == 8
    assert s.connections == 1  # keep-alive: one pooled connection for every request


def test_connection_refused_on_a_real_port() -> None:
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retries=1, backoff=0.01) as c, \
            pytest.raises(cc.ServiceConnectionError, match="ConnectError"):
        c.codecs()


# --------------------------------------------------------------------------- lifecycle

def test_context_manager_closes_the_pool(server: Server) -> None:
    with Client(server.url) as c:
        c.codecs()
    assert c._http.is_closed
    with pytest.raises(RuntimeError):
        c.codecs()


def test_async_client_against_the_server(server: Server) -> None:
    x = tensor()

    async def main() -> None:
        async with AsyncClient(server.url, api_key="k") as c:
            blobs = await asyncio.gather(*(c.compress(x, m, 4, 1) for m in METHODS))
            assert list(blobs) == [codec.encode(x, m, 4, 1) for m in METHODS]
            y = await c.decompress(blobs[0])
            np.testing.assert_array_equal(y, codec.decode(blobs[0]))
            assert await c.inspect(blobs[1]) == codec.inspect(blobs[1])
            assert await c.codecs() == json.loads(json.dumps(codec.methods()))
            with pytest.raises(cc.MalformedBitstreamError):
                await c.decompress(blobs[0][:-2])
        assert c._http.is_closed

    asyncio.run(main())


def test_async_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr(cc.asyncio, "sleep", fake_sleep)
    script = Script(unavailable("1"), httpx.ConnectError("refused"), ok_codecs)

    async def main() -> None:
        async with AsyncClient("http://test", transport=httpx.MockTransport(script),
                               backoff=0.1) as c:
            assert await c.codecs() == [{"name": "linear"}]

    asyncio.run(main())
    assert len(script.requests) == 3 and delays[0] == 1.0 and 0.2 <= delays[1] <= 0.22
