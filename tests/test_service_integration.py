"""End-to-end tests against a real `featcodec serve` process (see conftest.py)."""

from __future__ import annotations

import asyncio
import io
import pickle
import socket
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

import codec

from conftest import Server

pytestmark = pytest.mark.integration

NPY = {"Content-Type": "application/x-npy"}
MSGPACK = {"Content-Type": "application/msgpack"}
OCTET = {"Content-Type": "application/octet-stream"}
METHODS = [m["name"] for m in codec.methods()]
# Given parameters per method, per-tensor and per-channel (axis=1 has 3 channels).
GIVEN = {
    "linear": {"scale": 0.05, "zero_point": 3},
    "symmetric": {"scale": 0.05, "signed": True, "restricted": True},
    "mulaw": {"mu": 100, "max_abs": 3.0},
    "log": {"beta": 1.5, "max_abs": 3.0},
    "exp": {"lam": 0.5, "max_abs": 3.0},
}
PER_CHANNEL = {
    "linear": {"scale": [0.05, 0.1, 0.2], "zero_point": [1, 2, 3]},
    "symmetric": {"scale": [0.05, 0.1, 0.2]},
    "mulaw": {"mu": 50, "max_abs": [1.0, 2.0, 3.0]},
    "log": {"beta": [1.5, 1.2, 1.3], "max_abs": [1.0, 2.0, 3.0]},
    "exp": {"lam": [0.5, 1.0, 2.0], "max_abs": [3.0, 2.0, 1.0]},
}


def tensor(dtype: Any = np.float32, shape: tuple[int, ...] = (2, 3, 4, 5)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal(shape).astype(dtype)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def mp(x: np.ndarray, dtype: str | None = None) -> bytes:
    return msgpack.packb({"dtype": dtype or x.dtype.str, "shape": list(x.shape),
                          "data": x.tobytes()}, use_bin_type=True)


def query(params: dict[str, Any]) -> dict[str, str]:
    """Encode keyword params as the service expects: lists comma-separated, bools lower."""
    out = {}
    for k, v in params.items():
        if isinstance(v, bool):
            out[k] = str(v).lower()
        elif isinstance(v, list):
            out[k] = ",".join(map(str, v))
        else:
            out[k] = str(v)
    return out


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert {"type", "title", "status", "detail"} <= set(doc)
    assert doc["status"] == status
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert "Traceback" not in r.text
    return doc


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- round trips and byte equality -------------------------------------------------------


@pytest.mark.parametrize("body", ["npy", "msgpack"])
@pytest.mark.parametrize("method", METHODS)
def test_compress_matches_local_encode(client: httpx.Client, method: str, body: str) -> None:
    x = tensor()
    content, headers = (npy(x), NPY) if body == "npy" else (mp(x), MSGPACK)
    r = client.post("/v1/compress", params={"method": method, "bits": 4}, content=content,
                    headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == codec.encode(x, method=method, bits=4)
    assert int(r.headers["X-Compressed-Bytes"]) == len(r.content)
    assert int(r.headers["X-Original-Bytes"]) == x.nbytes
    y = codec.decode(r.content)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_given_params_match_local_encode(client: httpx.Client, method: str,
                                         per_channel: bool) -> None:
    x = tensor()
    params, axis = (PER_CHANNEL[method], 1) if per_channel else (GIVEN[method], None)
    q = {"method": method, "bits": 6, **query(params)}
    if axis is not None:
        q["axis"] = str(axis)
    r = client.post("/v1/compress", params=q, content=npy(x), headers=NPY)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(x, method=method, bits=6, axis=axis, **params)


@pytest.mark.parametrize("method", METHODS)
def test_fitted_per_channel_matches_local_encode(client: httpx.Client, method: str) -> None:
    x = tensor()
    r = client.post("/v1/compress", params={"method": method, "axis": -1, "bits": 3},
                    content=mp(x), headers=MSGPACK)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(x, method=method, bits=3, axis=-1)


def test_text_options_pass_through(client: httpx.Client) -> None:
    x = tensor()
    options = {o for m in codec.methods() for o in m["options"]}
    if "lam_fit" not in options:
        pytest.skip("the library has no text-valued option")
    r = client.post("/v1/compress", params={"method": "exp", "lam_fit": "equiprobable"},
                    content=npy(x), headers=NPY)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(x, method="exp", lam_fit="equiprobable")


@pytest.mark.parametrize("dtype", ["<f2", ">f4", "<f8", "float32"])
def test_msgpack_dtypes_and_byte_orders(client: httpx.Client, dtype: str) -> None:
    x = tensor(np.dtype(dtype).newbyteorder(">" if dtype.startswith(">") else "<"))
    r = client.post("/v1/compress", content=mp(x, dtype), headers=MSGPACK)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(x)
    assert codec.decode(r.content).dtype == x.dtype.newbyteorder("=")


@pytest.mark.parametrize("x", [tensor(">f8"), np.asfortranarray(tensor()), tensor(np.float16),
                               np.zeros((3, 0, 2), np.float32)], ids=["be-f8", "fortran",
                                                                     "f16", "empty"])
def test_npy_variants(client: httpx.Client, x: np.ndarray) -> None:
    r = client.post("/v1/compress", content=npy(x), headers=NPY)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(x)


@pytest.mark.parametrize("method", METHODS)
def test_local_encode_server_decompress(client: httpx.Client, method: str) -> None:
    x = tensor()
    blob = codec.encode(x, method=method, bits=5, axis=1)
    r = client.post("/v1/decompress", content=blob, headers=OCTET)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    y = np.load(io.BytesIO(r.content), allow_pickle=False)
    np.testing.assert_array_equal(y, codec.decode(blob))
    assert y.dtype == codec.decode(blob).dtype
    assert int(r.headers["X-Compressed-Bytes"]) == len(blob)


@pytest.mark.parametrize("accept", ["application/msgpack", "application/x-msgpack",
                                    "text/html;q=0.9, application/msgpack"])
def test_decompress_msgpack(client: httpx.Client, accept: str) -> None:
    x = tensor(np.float16)
    blob = codec.encode(x, method="mulaw", bits=8)
    r = client.post("/v1/decompress", content=blob, headers={**OCTET, "Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == accept.split(", ")[-1]
    doc = msgpack.unpackb(r.content, raw=False)
    y = np.frombuffer(doc["data"], np.dtype(doc["dtype"]).newbyteorder("<")).reshape(doc["shape"])
    np.testing.assert_array_equal(y, codec.decode(blob))
    assert doc["dtype"] == "float16"


@pytest.mark.parametrize("accept", ["*/*", "application/*", "application/x-npy",
                                    "application/msgpack;q=0.5, application/x-npy"])
def test_decompress_npy_by_default(client: httpx.Client, accept: str) -> None:
    blob = codec.encode(tensor())
    r = client.post("/v1/decompress", content=blob, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"


def test_inspect_matches_library(client: httpx.Client) -> None:
    blob = codec.encode(tensor(), method="log", bits=4, axis=1)
    r = client.post("/v1/inspect", content=blob, headers=OCTET)
    assert r.status_code == 200, r.text
    assert r.json() == codec.inspect(blob)


def test_codecs_come_from_the_library(client: httpx.Client) -> None:
    r = client.get("/v1/codecs")
    assert r.status_code == 200
    assert r.json() == {"methods": codec.methods()}


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


# --- errors ------------------------------------------------------------------------------


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


BAD_BODIES_400 = {
    "garbage-npy": (b"\x93NUMPY\x01\x00garbage", NPY),
    "not-npy": (b"hello world", NPY),
    "truncated-npy": (npy(tensor())[:-7], NPY),
    "pickled-object-npy": (_pickled_npy(), NPY),
    "pickle-as-npy": (pickle.dumps([1.0, 2.0]), NPY),
    "garbage-msgpack": (b"\xc1\xc1\xc1", MSGPACK),
    "msgpack-not-a-map": (msgpack.packb([1, 2, 3]), MSGPACK),
    "msgpack-missing-key": (msgpack.packb({"dtype": "float32", "shape": [1]}), MSGPACK),
    "msgpack-extra-key": (msgpack.packb({"dtype": "float32", "shape": [1], "data": b"\0" * 4,
                                         "x": 1}), MSGPACK),
    "msgpack-short-data": (msgpack.packb({"dtype": "float32", "shape": [2],
                                          "data": b"\0" * 4}), MSGPACK),
    "msgpack-str-data": (msgpack.packb({"dtype": "float32", "shape": [1], "data": "abcd"}),
                         MSGPACK),
    "msgpack-negative-shape": (msgpack.packb({"dtype": "float32", "shape": [-1],
                                              "data": b""}), MSGPACK),
    "msgpack-ext": (msgpack.packb({"dtype": "float32", "shape": [1],
                                   "data": msgpack.ExtType(1, b"xxxx")}), MSGPACK),
    "msgpack-trailing": (mp(tensor()) + b"\x00", MSGPACK),
    "empty-npy": (b"", NPY),
}


@pytest.mark.parametrize("name", BAD_BODIES_400)
def test_malformed_tensor_bodies_are_400(client: httpx.Client, name: str) -> None:
    content, headers = BAD_BODIES_400[name]
    doc = assert_problem(client.post("/v1/compress", content=content, headers=headers), 400)
    assert doc["type"] == "urn:featcodec:problem:malformed-body"


def _corrupt(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


BAD_STREAMS = {
    "crc": _corrupt(codec.encode(tensor())),
    "truncated": codec.encode(tensor())[:-3],
    "trailing": codec.encode(tensor()) + b"\0",
    "magic": b"XXXX" + codec.encode(tensor())[4:],
    "empty": b"",
    "garbage": b"\x00" * 64,
}


@pytest.mark.parametrize("endpoint", ["/v1/decompress", "/v1/inspect"])
@pytest.mark.parametrize("name", BAD_STREAMS)
def test_corrupt_bitstreams_are_400(client: httpx.Client, endpoint: str, name: str) -> None:
    doc = assert_problem(client.post(endpoint, content=BAD_STREAMS[name], headers=OCTET), 400)
    assert doc["type"] == "urn:featcodec:problem:malformed-bitstream"


@pytest.mark.parametrize("params,content,headers", [
    ({"method": "nope"}, npy(tensor()), NPY),
    ({"bits": 9}, npy(tensor()), NPY),
    ({"bits": 0}, mp(tensor()), MSGPACK),
    ({"bits": "eight"}, npy(tensor()), NPY),
    ({"axis": 7}, npy(tensor()), NPY),
    ({"scale": "abc"}, npy(tensor()), NPY),
    ({"scale": "0.1,0.2"}, npy(tensor()), NPY),
    ({"scale": "nan"}, npy(tensor()), NPY),
    ({"method": "linear", "restricted": "true"}, npy(tensor()), NPY),
    ({"signed": "maybe"}, npy(tensor()), NPY),
    ({"sclae": "0.1"}, npy(tensor()), NPY),
    ({}, npy(np.array([1.0, np.nan], np.float32)), NPY),
    ({}, mp(np.array([np.nan], np.float64)), MSGPACK),
    ({}, npy(np.arange(6, dtype=np.int32)), NPY),
    ({}, npy(np.zeros(3, dtype=[("a", "<f4")])), NPY),
    ({}, mp(np.arange(6, dtype=np.int32), "int32"), MSGPACK),
    ({}, mp(tensor(), "complex64"), MSGPACK),
], ids=["unknown-method", "bits-9", "bits-0", "bits-text", "axis", "scale-text",
        "scale-count", "scale-nan", "option-for-other-method", "bool-text", "unknown-param",
        "nan-npy", "nan-msgpack", "int-npy", "structured-npy", "int-msgpack",
        "complex-msgpack"])
def test_invalid_parameters_are_422(client: httpx.Client, params: dict[str, Any],
                                    content: bytes, headers: dict[str, str]) -> None:
    doc = assert_problem(client.post("/v1/compress", params=params, content=content,
                                     headers=headers), 422)
    assert doc["type"] == "urn:featcodec:problem:invalid-parameters"


@pytest.mark.parametrize("endpoint,content_type", [
    ("/v1/compress", "text/plain"), ("/v1/compress", "application/json"),
    ("/v1/compress", "application/octet-stream"), ("/v1/decompress", "application/x-npy"),
    ("/v1/inspect", "application/json"),
])
def test_unsupported_content_type_is_415(client: httpx.Client, endpoint: str,
                                         content_type: str) -> None:
    r = client.post(endpoint, content=b"x", headers={"Content-Type": content_type})
    assert_problem(r, 415)


def test_compress_without_content_type_is_415(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/compress", content=npy(tensor())), 415)


@pytest.mark.parametrize("accept", ["text/html", "application/json",
                                    "application/msgpack;q=0, application/x-npy;q=0"])
def test_unsupported_accept_is_406(client: httpx.Client, accept: str) -> None:
    r = client.post("/v1/decompress", content=codec.encode(tensor()),
                    headers={**OCTET, "Accept": accept})
    assert_problem(r, 406)


def test_unknown_route_and_verb_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/nothing"), 404)
    r = client.get("/v1/compress")
    assert_problem(r, 405)
    assert "POST" in r.headers["allow"]


def test_body_over_limit_with_content_length_is_413(small_server: Server) -> None:
    body = npy(tensor(shape=(64, 64)))  # 16 KiB, over the 4 KiB limit
    r = httpx.post(small_server.url + "/v1/compress", content=body, headers=NPY)
    doc = assert_problem(r, 413)
    assert "Content-Length" in doc["detail"]


def test_chunked_body_over_limit_is_413(small_server: Server) -> None:
    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(16):
            yield b"\0" * 1024

    for endpoint, headers in (("/v1/compress", NPY), ("/v1/decompress", OCTET)):
        r = httpx.post(small_server.url + endpoint, content=chunks(), headers=headers)
        doc = assert_problem(r, 413)
        assert "exceeds the limit" in doc["detail"]


def test_too_many_elements(small_server: Server) -> None:
    x = np.zeros(1001, np.float16)  # 2 KiB: under the body limit, over max_elements
    assert_problem(httpx.post(small_server.url + "/v1/compress", content=npy(x),
                              headers=NPY), 413)
    assert_problem(httpx.post(small_server.url + "/v1/compress", content=mp(x),
                              headers=MSGPACK), 413)
    r = httpx.post(small_server.url + "/v1/decompress", content=codec.encode(x, bits=1))
    assert_problem(r, 400)  # the library's own element limit: a FormatError
    ok = httpx.post(small_server.url + "/v1/compress", content=npy(x[:1000]), headers=NPY)
    assert ok.status_code == 200


# --- metrics, OpenAPI, concurrency, workers ----------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: httpx.Client) -> Samples:
    return scrape_text(c.get("/metrics"))


def scrape_text(r: httpx.Response) -> Samples:
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def sample(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move(client: httpx.Client) -> None:
    body = npy(tensor())
    ep = {"endpoint": "/v1/compress", "method": "exp"}
    before = scrape(client)
    r = client.post("/v1/compress", params={"method": "exp"}, content=body, headers=NPY)
    assert r.status_code == 200
    client.post("/v1/compress", params={"method": "exp", "bits": 9}, content=body, headers=NPY)
    after = scrape(client)
    assert sample(after, "featcodec_http_requests_total", status="200", **ep) == \
        sample(before, "featcodec_http_requests_total", status="200", **ep) + 1
    assert sample(after, "featcodec_http_requests_total", status="422", **ep) == \
        sample(before, "featcodec_http_requests_total", status="422", **ep) + 1
    assert sample(after, "featcodec_http_errors_total", endpoint="/v1/compress", status="422") \
        >= sample(before, "featcodec_http_errors_total", endpoint="/v1/compress",
                  status="422") + 1
    assert sample(after, "featcodec_http_request_body_bytes_total", **ep) == \
        sample(before, "featcodec_http_request_body_bytes_total", **ep) + 2 * len(body)
    assert sample(after, "featcodec_http_response_body_bytes_total", **ep) >= \
        sample(before, "featcodec_http_response_body_bytes_total", **ep) + len(r.content)
    assert sample(after, "featcodec_http_request_duration_seconds_count", **ep) == \
        sample(before, "featcodec_http_request_duration_seconds_count", **ep) + 2


def test_openapi_document(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    validate(spec)
    paths = spec["paths"]
    assert {"/v1/compress", "/v1/decompress", "/v1/inspect", "/v1/codecs", "/healthz",
            "/readyz", "/metrics"} <= set(paths)
    compress = paths["/v1/compress"]["post"]
    assert {"application/x-npy", "application/msgpack"} <= set(
        compress["requestBody"]["content"])
    assert "application/octet-stream" in compress["responses"]["200"]["content"]
    assert "application/problem+json" in compress["responses"]["422"]["content"]
    declared = {p["name"] for p in compress["parameters"]}
    options = {o for m in codec.methods() for o in m["options"]}
    assert options | {"method", "bits", "axis"} <= declared  # no method option is unreachable
    assert "application/octet-stream" in \
        paths["/v1/decompress"]["post"]["requestBody"]["content"]
    assert {"application/x-npy", "application/msgpack"} <= set(
        paths["/v1/decompress"]["post"]["responses"]["200"]["content"])
    schemas = spec["components"]["schemas"]
    assert {"Problem", "InspectResult", "CodecList"} <= set(schemas)
    assert schemas["Problem"].get("examples") and schemas["InspectResult"].get("examples")


def test_health_answers_during_a_large_compress(server: Server) -> None:
    """/healthz is sent once the server reports codec work in its thread pool, and must
    finish before that work does. Were the codec run on the event loop, neither /metrics
    nor /healthz could answer until the compress had finished."""
    x = tensor(shape=(16, 64, 128, 128))  # 64 MiB of float32
    body = npy(x)
    order: list[str] = []

    async def scenario() -> tuple[httpx.Response, httpx.Response, bool]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            big = asyncio.create_task(c.post("/v1/compress", params={"method": "mulaw",
                                                                     "axis": 1},
                                             content=body, headers=NPY))
            big.add_done_callback(lambda _: order.append("compress"))
            busy = False
            while not big.done() and not busy:
                m = scrape_text(await c.get("/metrics"))
                busy = sample(m, "featcodec_jobs_in_progress") >= 1
            health = await c.get("/healthz")
            order.append("healthz")
            return await big, health, busy

    big, health, busy = asyncio.run(scenario())
    assert busy, "the server never reported work in progress"
    assert health.status_code == 200
    assert big.status_code == 200, big.text
    assert order == ["healthz", "compress"]
    assert big.content == codec.encode(x, method="mulaw", axis=1)


def test_two_workers_serve_and_aggregate_metrics(multi_server: Server) -> None:
    with httpx.Client(base_url=multi_server.url, timeout=60) as c:
        x = tensor()
        for _ in range(6):  # new connections, so both workers are likely to see some
            r = httpx.post(multi_server.url + "/v1/compress", content=npy(x), headers=NPY)
            assert r.status_code == 200 and r.content == codec.encode(x)
        m = scrape(c)
        assert sample(m, "featcodec_http_requests_total", endpoint="/v1/compress",
                      method="linear", status="200") == 6
        assert c.get("/readyz").json() == {"status": "ready"}


def test_client_disconnect_mid_body(server: Server, client: httpx.Client) -> None:
    labels = {"endpoint": "/v1/compress", "method": "linear", "status": "400"}
    before = sample(scrape(client), "featcodec_http_requests_total", **labels)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/compress HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-npy\r\nContent-Length: 100000\r\n\r\n"
                     + b"\0" * 1000)
    # The server notices the disconnect while reading: a 400 that nobody receives, not a 500.
    for _ in range(200):
        if sample(scrape(client), "featcodec_http_requests_total", **labels) > before:
            break
    else:
        pytest.fail("the aborted request was never accounted for")
    assert client.get("/healthz").status_code == 200


def test_no_request_reached_the_catch_all(server: Server, client: httpx.Client) -> None:
    """Runs last in this module: nothing above may have produced a 500."""
    m = scrape(client)
    assert not [k for k, v in m.items() if k[0] == "featcodec_http_requests_total"
                and ("status", "500") in k[1] and v]
    assert "Traceback" not in server.stderr()
    assert "unhandled error" not in server.stderr()
