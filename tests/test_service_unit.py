"""In-process tests of the HTTP layer (FastAPI TestClient), next to the real-server ones."""

from __future__ import annotations

import asyncio
import io
import os
import math
import socket
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from fastapi import Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec import container
from app import bodies, limits, options, routers
from app.cli import main
from app.main import create_app
from app.metrics import SNR_SAMPLE
from app.problems import (BodyTooLarge, InvalidParameters, MalformedBody, NotAcceptable,
                          ProblemError)
from app.routers import codec as codec_routes
from app.settings import Settings
from conftest import peak_memory

with warnings.catch_warnings():  # Starlette's notice about its future test client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

NPY = {"Content-Type": "application/x-npy"}
MSGPACK = {"Content-Type": "application/msgpack"}
CLIENT_ERRORS = {400, 406, 413, 415, 422}
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the shared client is stateless


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(max_body_bytes=1 << 16, max_elements=4096))) as c:
        yield c


def test_round_trip_in_process(client: TestClient) -> None:
    x = np.linspace(-2, 2, 60, dtype=np.float32).reshape(3, 4, 5)
    r = client.post("/v1/compress?method=symmetric&bits=5&axis=0", content=npy(x), headers=NPY)
    assert r.status_code == 200
    assert r.content == codec.encode(x, method="symmetric", bits=5, axis=0)
    d = client.post("/v1/decompress", content=r.content,
                    headers={"Accept": "application/msgpack"})
    doc = msgpack.unpackb(d.content)
    assert doc["shape"] == [3, 4, 5] and doc["dtype"] == "float32"


def test_readyz_is_503_until_startup_ran() -> None:
    app = create_app(Settings())
    r = TestClient(app).get("/readyz")  # no context manager: the lifespan never starts
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200


def test_catch_all_hides_details() -> None:
    app = create_app(Settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 500
    assert "secret" not in r.text and "Traceback" not in r.text


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATCODEC_MAX_BODY_BYTES", "123")
    monkeypatch.setenv("FEATCODEC_PORT", "9001")
    s = Settings()
    assert (s.max_body_bytes, s.port, s.host, s.workers) == (123, 9001, "127.0.0.1", 1)
    assert Settings.model_fields["max_body_bytes"].default == 256 * 2**20


@pytest.mark.parametrize("accept,expected", [
    (None, "a/x"), ("", "a/x"), ("*/*", "a/x"), ("a/y", "a/y"), ("a/*;q=0.5, a/y", "a/y"),
    ("a/x;q=0.2, a/y;q=0.3", "a/y"), ("a/*, a/x;q=0", "a/y"), ("*/*;q=nan, a/y", "a/y"),
])
def test_negotiate(accept: str | None, expected: str) -> None:
    assert bodies.negotiate(accept, ["a/x", "a/y"]) == expected


@pytest.mark.parametrize("accept", ["b/x", "a/x;q=0, a/y;q=0", "*/*;q=0", "a/x;q=oops"])
def test_negotiate_refuses(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        bodies.negotiate(accept, ["a/x", "a/y"])


@pytest.mark.parametrize("name,text,value", [
    ("signed", "True", True), ("restricted", "0", False), ("scale", "0.5", 0.5),
    ("zero_point", "3", 3), ("max_abs", "1, 2.5,3", [1, 2.5, 3]), ("lam_fit", "mse", "mse"),
    ("future_option", "7", 7),
])
def test_option_values(name: str, text: str, value: object) -> None:
    assert options.parse(name, text) == value
    assert type(options.parse(name, text)) is type(value)


@pytest.mark.parametrize("name,text", [("signed", "maybe"), ("scale", "abc"),
                                       ("max_abs", "1,,2"), ("mu", "")])
def test_option_values_refused(name: str, text: str) -> None:
    with pytest.raises(InvalidParameters):
        options.parse(name, text)


def test_msgpack_encoding_round_trips() -> None:
    x = np.arange(12, dtype=">f8").reshape(3, 4)
    y = bodies.decode_msgpack(bodies.encode_msgpack(x), 100, 1 << 20)
    np.testing.assert_array_equal(x, y)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(body=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b),
                      st.binary(max_size=200).map(lambda b: b"FCQT\x01" + b)),
       endpoint=st.sampled_from(["/v1/compress", "/v1/decompress", "/v1/inspect"]),
       content_type=st.sampled_from(["application/x-npy", "application/msgpack",
                                     "application/octet-stream", "text/plain"]))
def test_arbitrary_bytes_never_cause_500(client: TestClient, body: bytes, endpoint: str,
                                         content_type: str) -> None:
    r = client.post(endpoint, content=body, headers={"Content-Type": content_type})
    assert r.status_code in CLIENT_ERRORS | {200}, r.text
    if r.status_code != 200:
        assert r.headers["content-type"] == "application/problem+json"


_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
            | st.text(max_size=8) | st.binary(max_size=16))
_values = st.recursive(_scalars,
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(doc=st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["float32", ">f2", "<f8", "int8", "f4,f4", "O"]) | _values,
    "shape": st.lists(st.integers(-2, 5), max_size=4) | _values,
    "data": st.binary(max_size=64) | _values,
}) | _values)
def test_arbitrary_msgpack_documents_never_cause_500(client: TestClient, doc: object) -> None:
    r = client.post("/v1/compress", content=msgpack.packb(doc, use_bin_type=True),
                    headers=MSGPACK)
    assert r.status_code in CLIENT_ERRORS | {200}, r.text


_SEEDS = [codec.encode(np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4), m["name"],
                       bits=b, axis=a)
          for m in codec.methods() for b in (2, 5, 8) for a in (None, 1)]


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.sampled_from(_SEEDS), data=st.data())
def test_mutated_streams_with_valid_crc_never_cause_500(client: TestClient, seed: bytes,
                                                        data: st.DataObject) -> None:
    """Past the CRC check: the header's fields themselves are hostile."""
    s = bytearray(seed)
    for pos, value in data.draw(st.lists(st.tuples(st.integers(4, len(s) - 5),
                                                   st.integers(0, 255)), min_size=1, max_size=3)):
        s[pos] = value
    s[-4:] = zlib.crc32(s[:-4]).to_bytes(4, "little")
    for endpoint in ("/v1/inspect", "/v1/decompress"):
        r = client.post(endpoint, content=bytes(s))
        assert r.status_code in (200, 400), r.text


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_cli_rejects_bad_settings_before_starting(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEATCODEC_WORKERS", "0")
    assert main(["serve"]) == 2
    assert "workers" in capsys.readouterr().err


def test_decompress_refuses_an_output_over_the_body_limit() -> None:
    """A few-byte coded stream of a constant tensor must not make the server allocate it."""
    import numpy as np
    from fastapi.testclient import TestClient

    import codec
    from app.main import create_app
    from app.settings import Settings

    blob = codec.encode(np.ones((4096, 1024), np.float32), "linear", 8, entropy="ans")
    assert len(blob) < 1024
    app = create_app(Settings(max_body_bytes=1 << 20))
    with TestClient(app) as c:
        r = c.post("/v1/decompress", content=blob,
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "decoded tensor" in r.json()["detail"]


def test_a_corrupt_stream_over_the_body_limit_is_still_a_400() -> None:
    """The size is read from the header before the CRC is checked; a corrupt stream must
    still be reported as corrupt, as it was when the CRC came first."""
    blob = bytearray(codec.encode(np.ones((4096, 1024), np.float32), "linear", 8,
                                  entropy="ans"))
    blob[-1] ^= 0xFF
    with TestClient(create_app(Settings(max_body_bytes=1 << 20))) as c:
        r = c.post("/v1/decompress", content=bytes(blob),
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "urn:featcodec:problem:malformed-bitstream"
    assert "CRC" in r.json()["detail"]


# --------------------------------------------------------------------------- fast paths


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("shape", [(2, 3, 40), (4, 1000)], ids=["whole", "streamed"])
def test_bodies_sent_in_chunks(client: TestClient, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    for content, headers in ((npy(x), NPY), (bodies.encode_msgpack(x), MSGPACK)):
        cuts = [1, 7, 70, 71, 400, 11_000, 13_001]
        r = client.post("/v1/compress?bits=6", content=iter(_split(content, cuts)),
                        headers=headers)
        assert r.status_code == 200, r.text
        assert r.content == codec.encode(x, bits=6)
        d = client.post("/v1/decompress", content=iter(_split(r.content, [3, 3, 50])))
        assert d.status_code == 200, d.text
        assert d.headers["x-compressed-bytes"] == str(len(r.content))
        np.testing.assert_array_equal(np.load(io.BytesIO(d.content)), codec.decode(r.content))


_NPY_BODIES = [npy(np.arange(24, dtype="<f4").reshape(2, 3, 4)),
               npy(np.asfortranarray(np.arange(20, dtype=">f8").reshape(4, 5))),
               npy(np.full((), 1.5, np.float16)), npy(np.zeros((0, 5), np.float32)),
               npy(np.arange(6, dtype=np.float32))[:-3], npy(np.arange(6, dtype=np.float32)) + b"x",
               npy(np.arange(6, dtype=np.int32)), b"\x93NUMPY\x01\x00" + bytes(range(60)),
               b"\x93NUMP", b""]


@settings(max_examples=200, deadline=None)
@given(body=st.sampled_from(_NPY_BODIES), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_npy_chunks_parse_as_the_joined_body(body: bytes, cuts: list[int]) -> None:
    def outcome(b: bytes | list[bytes]) -> tuple[object, ...]:
        try:
            arr = bodies.decode_npy(b, 4096)
        except ProblemError as exc:
            return type(exc), exc.detail
        return arr.dtype, arr.shape, arr.tobytes()

    assert outcome(_split(body, cuts)) == outcome(body)


class _Upload:
    """What :func:`bodies.receive_npy` uses of a request: its headers, and its body arriving
    chunk by chunk (made as they are read, as a server makes them)."""

    def __init__(self, body: bytes, cuts: list[int], declared: bool = True) -> None:
        self.edges = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
        self.body = body
        self.headers = {"content-length": str(len(body))} if declared else {}
        self.read = 0  # bytes handed out

    async def stream(self) -> Any:
        for a, b in zip(self.edges, self.edges[1:]):
            self.read = b
            yield self.body[a:b]  # a new bytes object, like a server's chunk
        yield b""


def _received(upload: _Upload, limit: int = 1 << 20, max_elements: int = 4096) -> Any:
    return asyncio.run(bodies.receive_npy(upload, limit, max_elements))  # type: ignore[arg-type]


_BIG_NPY = [npy(np.arange(5000, dtype="<f4").reshape(50, 100)),
            npy(np.asfortranarray(np.arange(3000, dtype=">f8").reshape(60, 50))),
            npy(np.arange(5000, dtype="<f4"))[:-3], npy(np.arange(5000, dtype="<f4")) + b"x",
            npy(np.arange(5000, dtype="<i4")), npy(np.arange(9000, dtype="<f4"))]


@settings(max_examples=300, deadline=None)
@given(body=st.sampled_from(_NPY_BODIES + _BIG_NPY), cuts=st.lists(st.integers(0, 40_000),
                                                                     max_size=8),
       declared=st.booleans())
def test_npy_received_chunk_by_chunk_parses_as_the_joined_body(body: bytes, cuts: list[int],
                                                               declared: bool) -> None:
    """Streamed into its array as it arrives, a .npy body gives decode_npy's array, or its
    kind of error (refused early when the data runs past what the header declares)."""
    def outcome(fn: Any) -> tuple[object, ...]:
        try:
            arr = fn()
        except ProblemError as exc:
            return (type(exc),)
        return arr.dtype, arr.shape, arr.tobytes()

    want = outcome(lambda: bodies.decode_npy(body, 8192))
    assert outcome(lambda: _received(_Upload(body, cuts, declared), max_elements=8192)) == want


def test_npy_stream_is_refused_before_the_rest_arrives() -> None:
    x = np.arange(9000, dtype="<f4")
    cuts = list(range(16_384, 40_000, 4096))
    long = _Upload(npy(x)[:16_384] + npy(x)[:16_384] * 2, cuts)  # data past the header's
    with pytest.raises(MalformedBody, match="longer than"):
        _received(long, max_elements=9000)
    assert long.read < len(long.body)
    many = _Upload(npy(x), cuts)  # 9000 elements, 4096 allowed: refused from the header
    with pytest.raises(BodyTooLarge):
        _received(many)
    assert many.read < len(many.body)
    over = _Upload(npy(x), cuts, declared=False)  # fits max_elements, not the byte limit
    with pytest.raises(BodyTooLarge):
        _received(over, limit=30_000, max_elements=9000)
    assert over.read < len(over.body)


def test_npy_stream_holds_one_copy_of_the_tensor() -> None:
    """Chunks go into the array as they come: peak memory is the array, not the body
    and the array (as reading every chunk before parsing would take)."""
    x = np.arange(1 << 18, dtype="<f4")  # 1 MiB
    upload = _Upload(npy(x), list(range(0, 1 << 20, 65536)))
    peak, exc = peak_memory(_received, upload, 2 << 20, 1 << 18)
    assert exc is None
    assert peak < 1.2 * x.nbytes, peak


@pytest.mark.parametrize("x", [
    np.full((), 1.25, np.float32), np.zeros((0, 3), np.float16),
    np.arange(12, dtype=">f4").reshape(3, 4), np.asfortranarray(np.ones((4, 5))),
    np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    np.arange(100, dtype=np.float16), np.arange(10_000, dtype=np.float32),
    np.arange(70_000, dtype=np.float32),  # bin8, bin16 and bin32 data lengths
], ids=["0-d", "empty", "big-endian", "fortran", "strided", "bin8", "bin16", "bin32"])
def test_serializers_write_what_numpy_and_msgpack_write(x: np.ndarray) -> None:
    ref = io.BytesIO()
    np.save(ref, np.asarray(x, order="C"), allow_pickle=False)
    assert bodies.encode_npy(x) == ref.getvalue()
    le = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    assert bodies.encode_msgpack(x) == msgpack.packb(
        {"dtype": x.dtype.name, "shape": list(x.shape), "data": le.tobytes()}, use_bin_type=True)

    for kind in (bodies.NPY, bodies.MSGPACK):  # written in place: the same bytes
        assert bodies.fill_tensor(kind, x.shape, x.dtype, lambda out: np.copyto(out, x)) \
            == bodies.encode_tensor(kind, x)


def test_fill_tensor_writes_into_the_body_and_drops_it_on_error() -> None:
    """In place when the elements start aligned (always for .npy; for MessagePack when
    its header's length allows, as for this shape), else through one aligned copy."""
    x = np.arange(1 << 22, dtype=np.float32).reshape(1, 256, 128, 128)  # 16 MiB
    for kind, shape, in_place in ((bodies.NPY, x.shape, True),
                                  (bodies.MSGPACK, x.shape, True),
                                  (bodies.MSGPACK, (x.size,), False)):
        peak, error = peak_memory(bodies.fill_tensor, kind, shape, x.dtype,
                                  lambda out: np.copyto(out, x.reshape(out.shape)))
        assert error is None
        assert (peak < x.nbytes * 1.1) == in_place, peak  # no array of its own

        def fail(out: np.ndarray) -> None:
            out[:10] = 1
            raise ValueError("corrupt")

        with pytest.raises(ValueError, match="corrupt"):
            bodies.fill_tensor(kind, x.shape, x.dtype, fail)


def _snr(x: np.ndarray, blob: bytes) -> float:
    xf = x.astype(np.float64)
    err = float(np.sum((codec.decode(blob).astype(np.float64) - xf) ** 2))
    return math.inf if err == 0 else 10 * math.log10(float(np.sum(xf ** 2)) / err)


_ENCODINGS = [dict(method=m["name"], bits=b, axis=a)
              for m in codec.methods() for b in (2, 5, 8) for a in (None, 1)] + [
    dict(method="symmetric", bits=4, axis=1, signed=True, restricted=True),
    dict(method="symmetric", bits=4, restricted=True),
    dict(method="symmetric", bits=4, signed=True, restricted=True, scale=0.1),  # saturates
    dict(method="linear", bits=3, clip="mse", entropy="ans"),
    dict(method="mulaw", bits=4, axis=2, clip="percentile", percentile=99.0, entropy="zstd"),
    dict(method="auto", target_bits=2.5), dict(method="linear", max_abs_error=0.05),
]


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f8"])
@pytest.mark.parametrize("kwargs", _ENCODINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in
                                                                      k.items()))
def test_snr_metric_is_exact_up_to_the_sample_size(kwargs: dict[str, object],
                                                   dtype: str) -> None:
    """The header's parameters give back the stream's codes: on a tensor no larger than
    the sample, the metric is the SNR of codec.decode itself."""
    x = np.random.default_rng(4).laplace(size=(2, 6, 7, 5)).astype(dtype)
    for data in (x, np.abs(x)):  # signed and unsigned codes
        blob = codec.encode(data, **kwargs)
        got = codec_routes._snr_db(data, container.parse(blob))
        assert got == pytest.approx(_snr(data, blob), rel=1e-9)


@pytest.mark.parametrize("kwargs", [{}, dict(method="mulaw", bits=4, axis=1),
                                    dict(bits=8, axis=3), dict(method="exp", bits=3, axis=0),
                                    dict(method="log", bits=4, entropy="ans")])
def test_snr_metric_of_a_large_tensor_comes_from_a_sample(kwargs: dict[str, object]) -> None:
    x = np.random.default_rng(5).laplace(size=(2, 64, 48, 40)).astype(np.float32)
    blob = codec.encode(x, **kwargs)
    h = container.parse(blob)
    sample = codec_routes._sample(x, h.axis)
    assert SNR_SAMPLE <= sample.size <= SNR_SAMPLE * 1.01
    assert np.shares_memory(sample, x)  # a view: nothing the size of the tensor is made
    if h.axis is not None:
        assert sample.shape[1] == x.shape[h.axis]  # every channel, for its parameters
    assert abs(codec_routes._snr_db(x, h) - _snr(x, blob)) < 0.5


@pytest.fixture
def pool_jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the jobs handed to the thread pool (the others ran on the event loop)."""
    names: list[str] = []
    real = routers.run_in_threadpool

    async def spy(func, *args):  # type: ignore[no-untyped-def]
        names.append(func.__name__)
        return await real(func, *args)

    monkeypatch.setattr(routers, "run_in_threadpool", spy)
    return names


def test_small_lone_jobs_run_on_the_event_loop(client: TestClient, pool_jobs: list[str]
                                               ) -> None:
    x = np.random.default_rng(0).laplace(size=(1, 64, 8, 8)).astype(np.float32)
    for method, bits in (("linear", 8), ("symmetric", 4), ("linear", 3)):
        r = client.post(f"/v1/compress?method={method}&bits={bits}", content=npy(x),
                        headers=NPY)
        assert r.content == codec.encode(x, method, bits)
        d = client.post("/v1/decompress", content=r.content)
        assert np.array_equal(np.load(io.BytesIO(d.content)), codec.decode(r.content))
    assert pool_jobs == []


@pytest.mark.parametrize("query", ["clip=mse", "method=auto&target_bits=3", "entropy=ans",
                                   "predictor=lorenzo&entropy=zstd", "target_snr_db=30",
                                   "method=mulaw", "method=log&bits=5", "method=exp&axis=1"])
def test_costlier_small_jobs_go_to_the_pool(client: TestClient, pool_jobs: list[str],
                                            query: str) -> None:
    x = np.random.default_rng(1).laplace(size=(1, 64, 8, 8)).astype(np.float32)
    r = client.post(f"/v1/compress?{query}", content=npy(x), headers=NPY)
    assert r.status_code == 200, r.text
    client.post("/v1/decompress", content=r.content)
    h = container.parse(r.content)  # an entropy-coded or compander stream decodes there too
    costly = h.coding != container.CODING_RAW or not h.mapping.linear
    assert pool_jobs == (["_compress", "_decompress"] if costly else ["_compress"])


def test_jobs_on_larger_tensors_go_to_the_pool(pool_jobs: list[str]) -> None:
    x = np.zeros((1, 65, 32, 32), np.float32)  # 266,240 bytes, just over the inline bound
    x[0, :, 0, 0] = np.arange(65)
    assert x.nbytes > routers.INLINE_MAX_BYTES
    with TestClient(create_app(Settings())) as c:
        r = c.post("/v1/compress", content=npy(x), headers=NPY)
        d = c.post("/v1/decompress", content=r.content)  # a small stream, a large output
    assert len(r.content) < routers.INLINE_MAX_BYTES
    assert np.array_equal(np.load(io.BytesIO(d.content)), codec.decode(r.content))
    assert pool_jobs == ["_compress", "_decompress"]


def test_alone_counts_the_v1_requests_in_flight() -> None:
    seen: list[bool] = []
    gate = asyncio.Event()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(limits.alone(Request(scope)))
        if len(seen) == 1:
            await gate.wait()  # the first request stays in flight
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = limits.LimitsMiddleware(app, Settings())

    async def call(path: str) -> None:
        scope = {"type": "http", "path": path, "headers": [], "query_string": b""}

        async def receive():  # type: ignore[no-untyped-def]
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):  # type: ignore[no-untyped-def]
            pass

        await middleware(scope, receive, send)

    async def run() -> None:
        first = asyncio.create_task(call("/v1/a"))
        while not seen:
            await asyncio.sleep(0)
        await call("/v1/b")  # while /v1/a is in flight
        gate.set()
        await first
        await call("/v1/c")

    asyncio.run(run())
    assert seen == [True, False, True]
    assert not limits.alone(Request({"type": "http", "headers": []}))  # no middleware


class _Transport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


def test_connections_get_tcp_nodelay_whatever_the_listening_socket() -> None:
    """uvicorn binds socket.socket(family) (protocol 0) for --workers > 1, and asyncio then
    leaves Nagle on: every response's tail would wait for the client's delayed ACK."""
    with socket.socket(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            conn, _ = listener.accept()
            with conn:
                assert not conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                limits._no_delay(_Transport(conn))  # type: ignore[arg-type]
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    limits._no_delay(_Transport(None))  # type: ignore[arg-type]
    a, b = socket.socketpair()
    with a, b:
        limits._no_delay(_Transport(a))  # type: ignore[arg-type]  # AF_UNIX: nothing to do


def test_service_processes_default_to_one_thread_each() -> None:
    """Scale with worker processes: the codec pool and BLAS/OpenMP default to one thread."""
    import json
    import subprocess
    import sys

    assert Settings().max_concurrency == 1
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    probe = ("import json, app.main, threadpoolctl; print(json.dumps("
             "[i['num_threads'] for i in threadpoolctl.threadpool_info()]))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    pools = json.loads(out)
    assert pools and all(n == 1 for n in pools), pools
    # ...while a deployment that asks for more gets it.
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OPENBLAS_NUM_THREADS": "2",
                                                             "OMP_NUM_THREADS": "2"},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert max(json.loads(out)) == 2
