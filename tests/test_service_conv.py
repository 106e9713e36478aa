"""POST /v1/conv2d and the registered layers (/v1/layers), against real `featcodec serve`
processes (see conftest.py), directly over HTTP and through codec.client."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

import codec
from codec import client as cc
from codec.client import AsyncClient, Client

from conftest import Server

pytestmark = pytest.mark.integration

MSGPACK = {"Content-Type": "application/msgpack"}
OCTET = {"Content-Type": "application/octet-stream"}
W8 = dict(method="symmetric", bits=8, axis=0, signed=True, restricted=True)


def start(**env: str) -> Server:
    server = Server(**env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def layers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layers")


@pytest.fixture(scope="module")
def ort_server(layers_dir: Path) -> Iterator[Server]:
    """Default backend (auto: onnxruntime is installed), layer writes open."""
    s = start(FEATCODEC_LAYERS_DIR=str(layers_dir), FEATCODEC_OPEN_LAYER_WRITES="true")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def numpy_server(layers_dir: Path) -> Iterator[Server]:
    """The numpy backend, sharing the layers directory: a second replica."""
    s = start(FEATCODEC_LAYERS_DIR=str(layers_dir), FEATCODEC_OPEN_LAYER_WRITES="true",
              FEATCODEC_CONV_BACKEND="numpy")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(ort_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ort_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http_np(numpy_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=numpy_server.url, timeout=60) as c:
        yield c


# --- helpers -------------------------------------------------------------------------------


def rand(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def tmap(a: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    return {"dtype": dtype or a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def npy_of(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def assert_problem(r: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert {"type", "title", "status", "detail"} <= set(doc)
    assert doc["status"] == status and isinstance(doc["detail"], str) and doc["detail"]
    assert "Traceback" not in r.text
    if type_ is not None:
        assert doc["type"] == "urn:featcodec:problem:" + type_, doc
    return doc


def timings(r: httpx.Response) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"(\w+);dur=([0-9.]+)", r.headers["server-timing"])}


def quantized_w(wf: np.ndarray) -> codec.QTensor:
    return codec.quantize(wf, **W8)


# Activations: unsigned linear (zero point != 0) and signed symmetric, per tensor.
X_F = rand((2, 8, 9, 10), seed=1) + 0.3
X_U8 = codec.encode(X_F)
X_S8 = codec.encode(X_F, method="symmetric", bits=8, signed=True)
W_F = rand((12, 8, 3, 3), seed=2, scale=0.2)

# name, x, w shape, attrs, bias
CASES: list[tuple[str, bytes, tuple[int, ...], dict[str, Any], np.ndarray | None]] = [
    ("plain", X_U8, (12, 8, 3, 3), {}, None),
    ("padding", X_U8, (12, 8, 3, 3), {"padding": 1}, None),
    ("asymmetric padding, stride", X_U8, (12, 8, 3, 3),
     {"padding": [0, 1, 2, 1], "stride": [2, 1]}, None),
    ("dilation", X_U8, (12, 8, 3, 3), {"dilation": 2, "padding": [2, 2]}, None),
    ("groups", X_U8, (12, 4, 3, 3), {"groups": 2, "padding": 1}, None),
    ("depthwise x2", X_U8, (16, 1, 3, 3), {"groups": 8, "padding": 1}, None),
    ("int32 bias", X_U8, (12, 8, 3, 3), {"padding": 1},
     np.arange(-6, 6, dtype=np.int32) * 37),
    ("float32 bias", X_U8, (12, 8, 1, 1), {},
     np.linspace(-1, 1, 12, dtype=np.float32)),
    ("signed x", X_S8, (12, 8, 3, 3), {"padding": 1},
     np.linspace(-1, 1, 12, dtype=np.float32)),
    ("relu", X_U8, (12, 8, 3, 3), {"padding": 1, "relu": True},
     np.linspace(-3, 1, 12, dtype=np.float32)),
]


def case_request(case: tuple[Any, ...], float_w: bool, **extra: Any
                 ) -> tuple[dict[str, Any], tuple[Any, ...], dict[str, Any]]:
    """The request body and the local qconv2d call it must equal."""
    _, x, wshape, attrs, bias = case
    wf = rand(wshape, seed=len(wshape) + wshape[0], scale=0.2)
    w = quantized_w(wf)
    body: dict[str, Any] = {"x": x, "w": tmap(wf) if float_w else codec.encode_qtensor(w),
                            **attrs, **extra}
    if bias is not None:
        body["bias"] = tmap(bias)
    kwargs = {**attrs, **extra, "bias": bias}
    return body, (codec.decode_qtensor(x), w), kwargs


# --- conv2d: results equal the library -----------------------------------------------------


@pytest.mark.parametrize("float_w", [False, True], ids=["w-bitstream", "w-float"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_float_output_equals_qconv2d(http: httpx.Client, case: tuple[Any, ...],
                                            float_w: bool) -> None:
    body, (x, w), kwargs = case_request(case, float_w)
    r = http.post("/v1/conv2d", content=pack(body), headers=MSGPACK)
    y = npy_of(r)
    ref = codec.qconv2d(x, w, **kwargs)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.array_equal(y, ref)
    assert r.headers["x-conv-backend"] == "ort"
    assert set(timings(r)) == {"parse", "decode", "conv", "encode"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_requantized_bitstream_equals_qconv2d(http: httpx.Client,
                                                     case: tuple[Any, ...]) -> None:
    body, (x, w), kwargs = case_request(case, float_w=False, out_scale=0.07, out_zero_point=5)
    r = http.post("/v1/conv2d", content=pack(body), headers=MSGPACK)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    ref = codec.qconv2d(x, w, **kwargs)
    assert isinstance(ref, codec.QTensor)
    assert r.content == codec.encode_qtensor(ref)


def test_conv2d_float_weights_equal_local_quantize(http: httpx.Client) -> None:
    """The server quantizes float weights exactly like codec.quantize(w, symmetric, 8, ...)."""
    for dtype in ("float32", ">f4", "float64", "float16"):
        wf = W_F.astype(np.dtype(dtype))
        body = {"x": X_U8, "w": tmap(wf, dtype), "padding": 1, "out_scale": 0.05}
        r = http.post("/v1/conv2d", content=pack(body), headers=MSGPACK)
        assert r.status_code == 200, r.text
        ref = codec.qconv2d(codec.decode_qtensor(X_U8), codec.quantize(wf, **W8), padding=1,
                            out_scale=0.05)
        assert r.content == codec.encode_qtensor(ref)


def test_conv2d_per_tensor_linear_weights(http: httpx.Client) -> None:
    wq = codec.quantize(W_F, "linear", 8)  # uint8 weights with a zero point, per tensor
    body = {"x": X_U8, "w": codec.encode_qtensor(wq), "bias": tmap(np.ones(12, np.float32))}
    y = npy_of(http.post("/v1/conv2d", content=pack(body), headers=MSGPACK))
    assert np.array_equal(y, codec.qconv2d(codec.decode_qtensor(X_U8), wq,
                                           bias=np.ones(12, np.float32)))


def test_conv2d_msgpack_response(http: httpx.Client) -> None:
    body = {"x": X_U8, "w": tmap(W_F), "padding": 1}
    for accept in ("application/msgpack", "application/x-msgpack",
                   "application/x-npy;q=0.5, application/msgpack"):
        r = http.post("/v1/conv2d", content=pack(body),
                      headers={**MSGPACK, "Accept": accept})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == accept.split(",")[-1].strip()
        obj = msgpack.unpackb(r.content)
        assert obj["dtype"] == "float32"
        y = np.frombuffer(obj["data"], "<f4").reshape(obj["shape"])
        ref = codec.qconv2d(codec.decode_qtensor(X_U8), quantized_w(W_F), padding=1)
        assert np.array_equal(y, ref)


def test_both_backends_identical_through_the_endpoint(http: httpx.Client,
                                                      http_np: httpx.Client) -> None:
    for case in CASES:
        for extra in ({}, {"out_scale": 0.03, "out_zero_point": 120}):
            body, _, _ = case_request(case, float_w=True, **extra)
            a = http.post("/v1/conv2d", content=pack(body), headers=MSGPACK)
            b = http_np.post("/v1/conv2d", content=pack(body), headers=MSGPACK)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert a.headers["x-conv-backend"] == "ort"
            assert b.headers["x-conv-backend"] == "numpy"
            assert a.content == b.content, case[0]


# --- conv2d: errors ------------------------------------------------------------------------


def _body(**kw: Any) -> bytes:
    return pack({"x": X_U8, "w": tmap(W_F), **kw})


def _corrupt(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[-3] ^= 0x10
    return bytes(b)


X_MULAW = codec.encode(X_F, method="mulaw", bits=8)
X_PER_CHANNEL = codec.encode(X_F, method="linear", bits=8, axis=1)
X_3D = codec.encode(X_F[0])

ERRORS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("no content type", _body(), {}, 415, "unsupported-media-type"),
    ("json", b'{"x": 1}', {"Content-Type": "application/json"}, 415, "unsupported-media-type"),
    ("not msgpack", b"\xc1\xc1\xc1", MSGPACK, 400, "malformed-body"),
    ("truncated msgpack", _body()[:-20], MSGPACK, 400, "malformed-body"),
    ("not a map", pack([1, 2]), MSGPACK, 400, "malformed-body"),
    ("ext type", msgpack.packb({"x": msgpack.ExtType(1, b"a")}), MSGPACK, 400,
     "malformed-body"),
    ("corrupt x", pack({"x": _corrupt(X_U8), "w": tmap(W_F)}), MSGPACK, 400,
     "malformed-bitstream"),
    ("x not a bitstream", pack({"x": b"hello", "w": tmap(W_F)}), MSGPACK, 400,
     "malformed-bitstream"),
    ("corrupt w", pack({"x": X_U8, "w": _corrupt(codec.encode_qtensor(quantized_w(W_F)))}),
     MSGPACK, 400, "malformed-bitstream"),
    ("w data length", pack({"x": X_U8, "w": {**tmap(W_F), "data": b"123"}}), MSGPACK, 400,
     "malformed-body"),
    ("w map keys", pack({"x": X_U8, "w": {"dtype": "float32"}}), MSGPACK, 400,
     "malformed-body"),
    ("missing w", pack({"x": X_U8}), MSGPACK, 422, "invalid-parameters"),
    ("unknown key", _body(stides=2), MSGPACK, 422, "invalid-parameters"),
    ("x as str", pack({"x": "abc", "w": tmap(W_F)}), MSGPACK, 422, "invalid-parameters"),
    ("w as int", pack({"x": X_U8, "w": 3}), MSGPACK, 422, "invalid-parameters"),
    ("int weights", pack({"x": X_U8, "w": tmap(W_F.astype(np.int32))}), MSGPACK, 422,
     "invalid-parameters"),
    ("nan weights", pack({"x": X_U8, "w": tmap(np.full((2, 8, 1, 1), np.nan, np.float32))}),
     MSGPACK, 422, "invalid-parameters"),
    ("mulaw x", pack({"x": X_MULAW, "w": tmap(W_F)}), MSGPACK, 422, "invalid-parameters"),
    ("per-channel x", pack({"x": X_PER_CHANNEL, "w": tmap(W_F)}), MSGPACK, 422,
     "invalid-parameters"),
    ("3-d x", pack({"x": X_3D, "w": tmap(W_F)}), MSGPACK, 422, "invalid-parameters"),
    ("channels mismatch", pack({"x": X_U8, "w": tmap(rand((4, 3, 3, 3)))}), MSGPACK, 422,
     "invalid-parameters"),
    ("groups", _body(groups=3), MSGPACK, 422, "invalid-parameters"),
    ("groups bool", _body(groups=True), MSGPACK, 422, "invalid-parameters"),
    ("stride 0", _body(stride=0), MSGPACK, 422, "invalid-parameters"),
    ("stride float", _body(stride=1.5), MSGPACK, 422, "invalid-parameters"),
    ("padding 5 values", _body(padding=[1, 1, 1, 1, 1]), MSGPACK, 422, "invalid-parameters"),
    ("kernel too big", pack({"x": X_U8, "w": tmap(rand((2, 8, 11, 11)))}), MSGPACK, 422,
     "invalid-parameters"),
    ("bias shape", _body(bias=tmap(np.ones(3, np.float32))), MSGPACK, 422,
     "invalid-parameters"),
    ("bias float64", _body(bias=tmap(np.ones(12, np.float64))), MSGPACK, 422,
     "invalid-parameters"),
    ("bias too large", _body(bias=tmap(np.full(12, 1e30, np.float32))), MSGPACK, 422,
     "invalid-parameters"),
    ("zero point without scale", _body(out_zero_point=3), MSGPACK, 422, "invalid-parameters"),
    ("zero point range", _body(out_scale=0.1, out_zero_point=300), MSGPACK, 422,
     "invalid-parameters"),
    ("scale 0", _body(out_scale=0.0), MSGPACK, 422, "invalid-parameters"),
    ("scale str", _body(out_scale="0.1"), MSGPACK, 422, "invalid-parameters"),
    ("relu int", _body(relu=1), MSGPACK, 422, "invalid-parameters"),
    ("huge output", _body(padding=10**6), MSGPACK, 413, "body-too-large"),
    ("accept text", _body(), {**MSGPACK, "Accept": "text/plain"}, 406, "not-acceptable"),
    ("accept npy for codes", _body(out_scale=0.1),
     {**MSGPACK, "Accept": "application/x-npy"}, 406, "not-acceptable"),
]


@pytest.mark.parametrize(("body", "headers", "status", "type_"),
                         [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_conv2d_errors(http: httpx.Client, body: bytes, headers: dict[str, str], status: int,
                       type_: str) -> None:
    r = http.post("/v1/conv2d", content=body, headers=headers)
    assert_problem(r, status, type_)


def test_conv2d_error_messages_are_clear(http: httpx.Client) -> None:
    cases = [(_body(groups=3), "divisible by groups"), (pack({"x": X_MULAW, "w": tmap(W_F)}),
                                                        "mulaw"),
             (pack({"x": X_PER_CHANNEL, "w": tmap(W_F)}), "per tensor"),
             (_body(stides=2), "stides")]
    for body, text in cases:
        r = http.post("/v1/conv2d", content=body, headers=MSGPACK)
        assert text in assert_problem(r, 422)["detail"]


def test_conv2d_body_limit(small_server: Server) -> None:
    r = httpx.post(small_server.url + "/v1/conv2d", content=_body(), headers=MSGPACK)
    assert_problem(r, 413, "body-too-large")


def test_ort_backend_missing_is_503(tmp_path: Path) -> None:
    """FEATCODEC_CONV_BACKEND=ort without onnxruntime: unready, conv endpoints 503."""
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('hidden by the test')\n")
    s = start(FEATCODEC_CONV_BACKEND="ort", PYTHONPATH=str(tmp_path),
              FEATCODEC_LAYERS_DIR=str(tmp_path / "layers"))
    try:
        assert_problem(httpx.get(s.url + "/readyz"), 503)
        r = httpx.post(s.url + "/v1/conv2d", content=_body(), headers=MSGPACK)
        assert "onnxruntime" in assert_problem(r, 503, "service-unavailable")["detail"]
        r = httpx.post(s.url + "/v1/layers/a/conv2d", content=X_U8, headers=OCTET)
        assert_problem(r, 503, "service-unavailable")
    finally:
        s.stop()


# --- registered layers ---------------------------------------------------------------------


def put(c: httpx.Client, name: str, w: Any, **kw: Any) -> httpx.Response:
    return c.put(f"/v1/layers/{name}", content=pack({"w": w, **kw}), headers=MSGPACK)


def test_layer_lifecycle(http: httpx.Client) -> None:
    bias = np.linspace(-1, 1, 12, dtype=np.float32)
    r = put(http, "life", tmap(W_F), bias=tmap(bias), padding=1)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/layers/life"
    info = r.json()
    w = quantized_w(W_F)
    stored = codec.encode_qtensor(w, restricted=True)
    assert info["name"] == "life" and info["weight_shape"] == [12, 8, 3, 3]
    assert info["bits"] == 8 and info["groups"] == 1 and info["padding"] == [1, 1, 1, 1]
    assert info["stride"] == [1, 1] and info["dilation"] == [1, 1] and info["bias"] == "float32"
    assert info["sha256"] == hashlib.sha256(stored).hexdigest()
    assert info["created"].endswith("Z")

    assert http.get("/v1/layers/life").json() == info
    listing = http.get("/v1/layers").json()
    assert info in listing["layers"] and listing["corrupt"] == []

    x = codec.decode_qtensor(X_U8)
    r = http.post("/v1/layers/life/conv2d", content=X_U8, headers=OCTET)
    assert np.array_equal(npy_of(r), codec.qconv2d(x, w, bias=bias, padding=1))
    assert set(timings(r)) == {"load", "decode", "conv", "encode"}
    r = http.post("/v1/layers/life/conv2d", content=X_U8,
                  params={"out_scale": 0.04, "out_zero_point": 9, "relu": "true"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == codec.encode_qtensor(codec.qconv2d(
        x, w, bias=bias, padding=1, out_scale=0.04, out_zero_point=9, relu=True))

    r = put(http, "life", codec.encode_qtensor(w), padding=1)  # replace: 200
    assert r.status_code == 200 and "location" not in r.headers
    assert r.json()["bias"] is None and r.json()["created"] >= info["created"]

    assert http.delete("/v1/layers/life").status_code == 204
    assert_problem(http.get("/v1/layers/life"), 404, "layer-not-found")
    assert_problem(http.post("/v1/layers/life/conv2d", content=X_U8, headers=OCTET), 404,
                   "layer-not-found")
    assert_problem(http.delete("/v1/layers/life"), 404, "layer-not-found")
    assert "life" not in [x["name"] for x in http.get("/v1/layers").json()["layers"]]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_conv_equals_qconv2d(http: httpx.Client, case: tuple[Any, ...]) -> None:
    _, x_blob, wshape, attrs, bias = case
    wf = rand(wshape, seed=wshape[0], scale=0.2)
    w = quantized_w(wf)
    layer_attrs = {k: v for k, v in attrs.items() if k != "relu"}
    extra = {"bias": tmap(bias)} if bias is not None else {}
    name = "case-" + re.sub(r"[^a-z0-9]+", "-", case[0])
    assert put(http, name, codec.encode_qtensor(w), **layer_attrs, **extra).status_code in (
        200, 201)
    x = codec.decode_qtensor(x_blob)
    relu = bool(attrs.get("relu"))
    for _ in range(3):  # cached layer and sessions: the same answer every time
        r = http.post(f"/v1/layers/{name}/conv2d", content=x_blob, headers=OCTET,
                      params={"relu": str(relu).lower()})
        assert np.array_equal(npy_of(r), codec.qconv2d(x, w, bias=bias, relu=relu,
                                                       **layer_attrs))
        r = http.post(f"/v1/layers/{name}/conv2d", content=x_blob, headers=OCTET,
                      params={"out_scale": 0.06, "out_zero_point": 2, "relu": str(relu)})
        assert r.content == codec.encode_qtensor(codec.qconv2d(
            x, w, bias=bias, relu=relu, out_scale=0.06, out_zero_point=2, **layer_attrs))


def test_layer_stores_the_sent_bitstream(http: httpx.Client) -> None:
    w = codec.quantize(W_F, "linear", 8, axis=0)  # per-channel uint8 with zero points
    blob = codec.encode_qtensor(w)
    info = put(http, "verbatim", blob).json()
    assert info["sha256"] == hashlib.sha256(blob).hexdigest()
    assert info["weights_bytes"] == len(blob) and info["method"] == "linear"
    assert not info["signed"] and info["per_channel"]
    http.delete("/v1/layers/verbatim")


LAYER_ERRORS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("content type", "e1", pack({"w": tmap(W_F)}), {"Content-Type": "application/x-npy"},
     415, "unsupported-media-type"),
    ("not msgpack", "e1", b"\xc1", MSGPACK, 400, "malformed-body"),
    ("corrupt w", "e1", pack({"w": _corrupt(codec.encode_qtensor(quantized_w(W_F)))}), MSGPACK,
     400, "malformed-bitstream"),
    ("missing w", "e1", pack({"padding": 1}), MSGPACK, 422, "invalid-parameters"),
    ("unknown key", "e1", pack({"w": tmap(W_F), "relu": True}), MSGPACK, 422,
     "invalid-parameters"),
    ("groups", "e1", pack({"w": tmap(W_F), "groups": 5}), MSGPACK, 422, "invalid-parameters"),
    ("bias shape", "e1", pack({"w": tmap(W_F), "bias": tmap(np.ones(2, np.int32))}), MSGPACK,
     422, "invalid-parameters"),
    ("mulaw w", "e1", pack({"w": codec.encode(W_F, "mulaw", 8)}), MSGPACK, 422,
     "invalid-parameters"),
    ("2-d w", "e1", pack({"w": tmap(W_F.reshape(12, -1))}), MSGPACK, 422,
     "invalid-parameters"),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "type_"),
                         [e[1:] for e in LAYER_ERRORS], ids=[e[0] for e in LAYER_ERRORS])
def test_put_layer_errors(http: httpx.Client, name: str, body: bytes, headers: dict[str, str],
                          status: int, type_: str) -> None:
    assert_problem(http.put(f"/v1/layers/{name}", content=body, headers=headers), status, type_)
    assert_problem(http.get(f"/v1/layers/{name}"), 404)


def test_layer_conv_errors(http: httpx.Client) -> None:
    assert put(http, "errs", tmap(W_F)).status_code in (200, 201)
    url = "/v1/layers/errs/conv2d"
    assert_problem(http.post(url, content=X_U8, headers={"Content-Type": "application/x-npy"}),
                   415, "unsupported-media-type")
    assert_problem(http.post(url, content=_corrupt(X_U8), headers=OCTET), 400,
                   "malformed-bitstream")
    assert_problem(http.post(url, content=X_MULAW, headers=OCTET), 422, "invalid-parameters")
    small = codec.encode(rand((1, 4, 5, 5)))
    assert_problem(http.post(url, content=small, headers=OCTET), 422, "invalid-parameters")
    assert_problem(http.post(url, content=X_U8, params={"out_scale": "abc"}), 422)
    assert_problem(http.post(url, content=X_U8, params={"out_scale": "nan"}), 422)
    assert_problem(http.post(url, content=X_U8, params={"out_zero_point": "1"}), 422)
    assert_problem(http.post(url, content=X_U8, params={"bogus": "1"}), 422)
    assert_problem(http.post(url, content=X_U8, headers={"Accept": "text/html"}), 406)
    assert_problem(http.post(url, content=X_U8, params={"out_scale": 1},
                             headers={"Accept": "application/msgpack"}), 406)
    r = http.post(url, content=X_U8, headers={"Accept": "application/msgpack"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = http.request(method, url, content=b"")
        assert_problem(r, 405)
        assert r.headers["allow"] == "POST"
    for method in ("POST", "PATCH", "OPTIONS"):
        r = http.request(method, "/v1/layers/errs", content=b"")
        assert_problem(r, 405)
        assert r.headers["allow"] == "GET, PUT, DELETE"


BAD_NAMES = ["..%2Fetc%2Fpasswd", "%2e%2e", "%2E", "..%2F..%2Fx", "a%2Fb", "a/b", "%2Fabs",
             "x" * 129, "%C3%A9", "-lead", ".hidden", "a%00b", "a%20b", "a%5Cb", "a:b",
             "%2e%2e%2f%2e%2e%2fx", "a%0Ab", "abc%0A", "%0A", "a%09b", ""]


@pytest.mark.parametrize("raw", BAD_NAMES, ids=[n[:20] or "empty" for n in BAD_NAMES])
def test_layer_names_are_validated(http: httpx.Client, layers_dir: Path, raw: str) -> None:
    before = sorted(p.name for p in layers_dir.parent.rglob("*"))
    body = pack({"w": tmap(W_F)})
    for method, path, kw in (("PUT", "", {"content": body, "headers": MSGPACK}),
                             ("GET", "", {}), ("DELETE", "", {}),
                             ("POST", "/conv2d", {"content": X_U8, "headers": OCTET})):
        url = httpx.URL(http.base_url.join("/").copy_with(raw_path=(
            f"/v1/layers/{raw}{path}").encode()))
        r = http.request(method, url, **kw)
        doc = assert_problem(r, 422, "invalid-parameters")
        assert "layer name" in doc["detail"]
    assert sorted(p.name for p in layers_dir.parent.rglob("*")) == before


def test_longest_name_is_fine(http: httpx.Client) -> None:
    name = "L" * 127 + "9"
    assert put(http, name, tmap(W_F)).status_code == 201
    assert http.get(f"/v1/layers/{name}").json()["name"] == name
    assert http.delete(f"/v1/layers/{name}").status_code == 204


def test_replicas_share_the_directory(http: httpx.Client, http_np: httpx.Client) -> None:
    """One replica writes, the other serves; replacements and deletions are noticed."""
    x = codec.decode_qtensor(X_U8)
    w1, w2 = quantized_w(W_F), quantized_w(-W_F[:, :, ::-1])
    assert put(http, "shared", codec.encode_qtensor(w1), padding=1).status_code == 201
    r = http_np.post("/v1/layers/shared/conv2d", content=X_U8, headers=OCTET)
    assert np.array_equal(npy_of(r), codec.qconv2d(x, w1, padding=1))
    assert r.headers["x-conv-backend"] == "numpy"
    # replaced by the other replica, with new attributes
    assert put(http_np, "shared", codec.encode_qtensor(w2), stride=2).status_code == 200
    r = http.post("/v1/layers/shared/conv2d", content=X_U8, headers=OCTET)
    assert np.array_equal(npy_of(r), codec.qconv2d(x, w2, stride=2))
    assert http.delete("/v1/layers/shared").status_code == 204
    assert_problem(http_np.post("/v1/layers/shared/conv2d", content=X_U8, headers=OCTET), 404)
    assert_problem(http_np.get("/v1/layers/shared"), 404)


def test_corrupt_layer_file_is_reported_not_served(http: httpx.Client, layers_dir: Path,
                                                   ort_server: Server) -> None:
    assert put(http, "broken", tmap(W_F), padding=1).status_code == 201
    assert http.post("/v1/layers/broken/conv2d", content=X_U8).status_code == 200  # cached
    path = layers_dir / "broken.fcl"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one bit of the weights
    path.write_bytes(bytes(data))
    for r in (http.get("/v1/layers/broken"),
              http.post("/v1/layers/broken/conv2d", content=X_U8, headers=OCTET),
              http.post("/v1/layers/broken/conv2d", content=X_U8, params={"out_scale": 1})):
        doc = assert_problem(r, 409, "corrupt-layer")
        assert "broken" in doc["detail"] and "SHA-256" in doc["detail"]
    listing = http.get("/v1/layers").json()
    assert listing["corrupt"] == ["broken"]
    assert "broken" not in [x["name"] for x in listing["layers"]]
    assert "corrupt layer file" in ort_server.stderr()
    text = http.get("/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["featcodec_corrupt_layer_files_total"] >= 1
    # truncated: the same
    path.write_bytes(bytes(data[:len(data) // 2]))
    assert_problem(http.get("/v1/layers/broken"), 409, "corrupt-layer")
    # it can be replaced, and deleted
    assert put(http, "broken", tmap(W_F)).status_code == 200
    assert http.get("/v1/layers/broken").status_code == 200
    path.write_bytes(b"garbage")
    assert http.delete("/v1/layers/broken").status_code == 204
    assert http.get("/v1/layers").json()["corrupt"] == []


def test_layers_survive_a_restart(tmp_path: Path) -> None:
    env = {"FEATCODEC_LAYERS_DIR": str(tmp_path / "store"),
           "FEATCODEC_OPEN_LAYER_WRITES": "true"}
    bias = np.arange(12, dtype=np.int32)
    s = start(**env)
    try:
        r = httpx.put(s.url + "/v1/layers/persist", headers=MSGPACK,
                      content=pack({"w": tmap(W_F), "bias": tmap(bias), "groups": 1,
                                    "padding": [1, 1]}))
        assert r.status_code == 201, r.text
        info = r.json()
    finally:
        s.stop()
    s = start(**env)
    try:
        assert httpx.get(s.url + "/v1/layers/persist").json() == info
        r = httpx.post(s.url + "/v1/layers/persist/conv2d", content=X_U8, headers=OCTET)
        ref = codec.qconv2d(codec.decode_qtensor(X_U8), quantized_w(W_F), bias=bias, padding=1)
        assert np.array_equal(npy_of(r), ref)
    finally:
        s.stop()


# --- auth ----------------------------------------------------------------------------------


def test_layer_writes_need_permission(server: Server) -> None:
    """Without API keys layer writes are closed (FEATCODEC_OPEN_LAYER_WRITES unset)."""
    r = httpx.put(server.url + "/v1/layers/nope", content=pack({"w": tmap(W_F)}),
                  headers=MSGPACK)
    assert_problem(r, 403, "forbidden")
    assert_problem(httpx.delete(server.url + "/v1/layers/nope"), 403, "forbidden")
    assert httpx.get(server.url + "/v1/layers").status_code in (200, 503)


def test_layer_writes_with_api_keys(tmp_path: Path) -> None:
    s = start(FEATCODEC_LAYERS_DIR=str(tmp_path), FEATCODEC_API_KEYS="k1,k2")
    try:
        body = pack({"w": tmap(W_F)})
        assert_problem(httpx.put(s.url + "/v1/layers/a", content=body, headers=MSGPACK), 401)
        assert_problem(httpx.put(s.url + "/v1/layers/a", content=body,
                                 headers={**MSGPACK, "Authorization": "Bearer bad"}), 401)
        with Client(s.url, api_key="k2") as c:
            assert c.put_layer("a", W_F)["name"] == "a"
            assert isinstance(c.layer_conv2d("a", X_U8), np.ndarray)
        assert_problem(httpx.delete(s.url + "/v1/layers/a"), 401)
        assert_problem(httpx.post(s.url + "/v1/layers/a/conv2d", content=X_U8), 401)
        with Client(s.url, api_key="k1") as c:
            c.delete_layer("a")
            assert c.list_layers() == []
    finally:
        s.stop()


# --- codec.client end to end ---------------------------------------------------------------


def test_client_conv2d(ort_server: Server) -> None:
    bias = np.linspace(-1, 1, 12, dtype=np.float32)
    x = codec.decode_qtensor(X_U8)
    w = quantized_w(W_F)
    with Client(ort_server.url) as c:
        y = c.conv2d(X_U8, W_F, bias, padding=1)
        assert isinstance(y, np.ndarray)
        assert np.array_equal(y, codec.qconv2d(x, w, bias=bias, padding=1))
        # a QTensor and an array for x, a bitstream for w, msgpack responses
        y = c.conv2d(x, codec.encode_qtensor(w), bias, padding=1, accept="msgpack")
        assert np.array_equal(y, codec.qconv2d(x, w, bias=bias, padding=1))
        y = c.conv2d(X_F, w, stride=2, groups=1, dilation=1)
        assert np.array_equal(y, codec.qconv2d(codec.decode_qtensor(codec.encode(X_F)), w,
                                               stride=2))
        blob = c.conv2d(X_U8, W_F, np.arange(12, dtype=np.int32), padding=[1, 0], relu=True,
                        out_scale=0.05, out_zero_point=3)
        assert blob == codec.encode_qtensor(codec.qconv2d(
            x, w, bias=np.arange(12, dtype=np.int32), padding=[1, 0], relu=True,
            out_scale=0.05, out_zero_point=3))
        with pytest.raises(cc.InvalidParametersError, match="divisible"):
            c.conv2d(X_U8, W_F, groups=3)
        with pytest.raises(cc.MalformedBitstreamError):
            c.conv2d(_corrupt(X_U8), W_F)


def test_client_layers(ort_server: Server, layers_dir: Path) -> None:
    x = codec.decode_qtensor(X_U8)
    w = quantized_w(W_F)
    bias = np.linspace(0, 1, 12, dtype=np.float32)
    with Client(ort_server.url) as c:
        info = c.put_layer("client.l1", W_F, bias, padding=1)
        assert info["name"] == "client.l1" and info["padding"] == [1, 1, 1, 1]
        assert c.get_layer("client.l1") == info
        assert "client.l1" in [x["name"] for x in c.list_layers()]
        y = c.layer_conv2d("client.l1", X_U8)
        assert np.array_equal(y, codec.qconv2d(x, w, bias=bias, padding=1))
        y = c.layer_conv2d("client.l1", X_U8, accept="msgpack", relu=True)
        assert np.array_equal(y, codec.qconv2d(x, w, bias=bias, padding=1, relu=True))
        blob = c.layer_conv2d("client.l1", x, out_scale=0.1, out_zero_point=0)
        assert blob == codec.encode_qtensor(codec.qconv2d(x, w, bias=bias, padding=1,
                                                          out_scale=0.1, out_zero_point=0))
        assert c.put_layer("client.l1", codec.encode_qtensor(w))["bias"] is None
        c.delete_layer("client.l1")
        with pytest.raises(cc.NotFoundError):
            c.get_layer("client.l1")
        with pytest.raises(cc.NotFoundError):
            c.layer_conv2d("client.l1", X_U8)
        with pytest.raises(cc.NotFoundError):
            c.delete_layer("client.l1")
        c.delete_layer("client.l1", missing_ok=True)
        with pytest.raises(cc.InvalidParametersError, match="layer name"):
            c.get_layer("../etc/passwd")
        with pytest.raises(cc.InvalidParametersError):
            c.put_layer("bad", W_F, groups=5)
        # a corrupt file: ConflictError
        c.put_layer("client.bad", W_F)
        (layers_dir / "client.bad.fcl").write_bytes(b"\x89FCL\r\n\x1a\n")
        with pytest.raises(cc.ConflictError) as info_exc:
            c.layer_conv2d("client.bad", X_U8)
        assert info_exc.value.type == "urn:featcodec:problem:corrupt-layer"
        c.delete_layer("client.bad")


def test_async_client_layers(ort_server: Server) -> None:
    async def run() -> None:
        async with AsyncClient(ort_server.url) as c:
            await c.put_layer("async1", W_F, padding=1)
            ys = await asyncio.gather(*(c.layer_conv2d("async1", X_U8) for _ in range(4)))
            ref = codec.qconv2d(codec.decode_qtensor(X_U8), quantized_w(W_F), padding=1)
            assert all(np.array_equal(y, ref) for y in ys)
            y = await c.conv2d(X_U8, W_F, padding=1)
            assert np.array_equal(y, ref)
            await c.delete_layer("async1")

    asyncio.run(run())


# --- metrics and OpenAPI -------------------------------------------------------------------


def test_metrics_for_conv_endpoints(http: httpx.Client) -> None:
    assert put(http, "metered", tmap(W_F)).status_code in (200, 201)
    http.post("/v1/layers/metered/conv2d", content=X_U8, headers=OCTET)
    http.post("/v1/conv2d", content=_body(), headers=MSGPACK)
    text = http.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("featcodec_conv_compute_seconds_count", endpoint="/v1/conv2d",
                 backend="ort") >= 1
    assert value("featcodec_conv_compute_seconds_count",
                 endpoint="/v1/layers/{name}/conv2d", backend="ort") >= 1
    assert value("featcodec_http_requests_total", endpoint="/v1/conv2d", method="linear",
                 status="200") >= 1
    assert value("featcodec_http_requests_total", endpoint="/v1/layers/{name}/conv2d",
                 method="linear", status="200") >= 1
    assert value("featcodec_http_request_body_bytes_total", endpoint="/v1/conv2d") > 0
    assert value("featcodec_http_response_body_bytes_total",
                 endpoint="/v1/layers/{name}/conv2d") > 0
    http.delete("/v1/layers/metered")


def test_openapi_documents_conv_and_layers(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    validate(spec)
    paths = spec["paths"]
    conv = paths["/v1/conv2d"]["post"]
    body = conv["requestBody"]["content"]["application/msgpack"]
    assert set(body["schema"]["required"]) == {"x", "w"} and "example" in body
    assert {"application/octet-stream", "application/x-npy", "application/msgpack"} <= set(
        conv["responses"]["200"]["content"])
    assert "Server-Timing" in conv["responses"]["200"]["headers"]
    for status in ("400", "406", "413", "415", "422"):
        assert status in conv["responses"]
    layer = paths["/v1/layers/{name}"]
    assert {"get", "put", "delete"} <= set(layer)
    assert "application/msgpack" in layer["put"]["requestBody"]["content"]
    assert {"200", "201"} <= set(layer["put"]["responses"])
    assert "409" in layer["get"]["responses"]
    lconv = paths["/v1/layers/{name}/conv2d"]["post"]
    assert "application/octet-stream" in lconv["requestBody"]["content"]
    assert {"404", "409"} <= set(lconv["responses"])
    assert "/v1/layers" in paths


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX file semantics", allow_module_level=True)
