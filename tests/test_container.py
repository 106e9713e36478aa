"""The bitstream container: corruption, truncation, hostile headers and limits.

Streams are hand-built here with ``struct``/``zlib`` from the documented layout
(little-endian): magic "FCQT", version, method id, flags, coding, dtype id,
bits, ndim, axis (0xFF = none); ndim ULEB128 dims; each stream parameter (one
per channel if per-channel); ULEB128 payload length; payload; CRC32 of
everything before it.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from math import prod

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec import FormatError
from streams import decode_only_raises_format_errors, mutate, reseal, seal

METHOD_IDS = {"linear": 1, "symmetric": 2, "mulaw": 3, "log": 4, "exp": 5}
# Stream parameters in order: (name, struct format, per-channel)
STREAM_PARAMS = {
    "linear": [("scale", "f", True), ("zero_point", "h", True)],
    "symmetric": [("scale", "f", True)],
    "mulaw": [("mu", "f", False), ("max_abs", "f", True)],
    "log": [("beta", "f", True), ("max_abs", "f", True)],
    "exp": [("lam", "f", True), ("max_abs", "f", True)],
}
GOOD_PARAMS = {"scale": 0.5, "zero_point": 3, "mu": 255.0, "max_abs": 2.0, "beta": 1.5,
               "lam": 0.75}
DTYPE_IDS = {"float16": 1, "float32": 2, "float64": 3}
FLAG_SIGNED, FLAG_RESTRICTED = 0x01, 0x02


def uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def params_bytes(method: str, channels: int | None, **over: float) -> bytes:
    out = b""
    for name, fmt, per_channel in STREAM_PARAMS[method]:
        v = over.get(name, GOOD_PARAMS[name])
        n = channels if per_channel and channels is not None else 1
        out += struct.pack(f"<{n}{fmt}", *([v] * n))
    return out


def build(method: str = "linear", shape: tuple[int, ...] = (2, 3), bits: int = 8,
          axis: int | None = None, flags: int = 0, *, magic: bytes = b"FCQT", version: int = 1,
          method_id: int | None = None, coding: int = 0, dtype_id: int = 2,
          ndim: int | None = None, axis_byte: int | None = None, shape_bytes: bytes | None = None,
          params: bytes | None = None, payload_len: int | None = None,
          payload: bytes | None = None, crc: bool = True, **param_over: float) -> bytes:
    """A stream from its fields; every field can be overridden, the CRC is valid by default."""
    head = struct.pack("<4sBBBBBBBB", magic, version,
                       METHOD_IDS[method] if method_id is None else method_id, flags, coding,
                       dtype_id, bits, len(shape) if ndim is None else ndim,
                       (0xFF if axis is None else axis) if axis_byte is None else axis_byte)
    head += b"".join(uleb(d) for d in shape) if shape_bytes is None else shape_bytes
    head += params_bytes(method, None if axis is None else shape[axis], **param_over) \
        if params is None else params
    n_bytes = (prod(shape) * bits + 7) // 8
    if payload is None:
        payload = bytes(n_bytes if payload_len is None else min(payload_len, 1 << 20))
    body = head + uleb(n_bytes if payload_len is None else payload_len) + payload
    return seal(body) if crc else body + b"\0\0\0\0"


def small_streams() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for method in METHOD_IDS:
        for bits, shape, axis, dtype in [(3, (2, 3), None, np.float32), (8, (5,), 0, np.float16),
                                         (2, (), None, np.float64), (5, (2, 0, 3), 2, np.float32),
                                         (7, (3, 1, 4), 0, np.float32)]:
            x = rng.standard_normal(shape).astype(dtype)
            out.append(codec.encode(x, method, bits, axis))
        out.append(codec.encode(np.abs(rng.standard_normal(9)), method, 1))
    out.append(codec.encode(rng.standard_normal(6).astype(np.float32), "symmetric", 4,
                            restricted=True))
    return out


VALID = small_streams()


# ----------------------------------------------------------------------------- the builder


def test_builder_reproduces_the_encoder() -> None:
    x = np.zeros((2, 3), np.float32)  # linear fit of zeros: scale 1, zero point 0, codes 0
    assert codec.encode(x, "linear", 8) == build(scale=1.0, zero_point=0)
    q = codec.quantize(np.full((4, 3), 2.0, np.float32), "symmetric", 4, axis=1)
    blob = build("symmetric", (4, 3), 4, axis=1, scale=float(q.scale[0]),
                 payload=np.packbits(np.ones((12, 1), np.uint8) *
                                     np.array([[1, 0, 0, 0]], np.uint8), bitorder="little"
                                     ).tobytes())
    assert codec.encode(np.full((4, 3), 2.0, np.float32), "symmetric", 4, axis=1) == blob
    for method in METHOD_IDS:
        y = codec.decode(build(method, (4, 5), 6, axis=0, flags=FLAG_SIGNED))
        assert y.shape == (4, 5) and y.dtype == np.float32
        info = codec.inspect(build(method, (4, 5), 6, axis=1))
        assert info["method"] == method and info["axis"] == 1 and info["signed"] is False


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("blob", VALID[:6] + VALID[-2:], ids=lambda b: f"{len(b)}B")
def test_crc_catches_every_single_bit_flip(blob) -> None:
    assert codec.decode(blob) is not None
    for bit in range(8 * len(blob)):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            codec.decode(bytes(bad))


def test_payload_bit_flips_are_caught_by_the_crc_alone() -> None:
    # Flips in the payload leave every header field intact: only the CRC sees them.
    blob = codec.encode(np.linspace(-1, 1, 64, dtype=np.float32), "linear", 8)
    start = codec.inspect(blob)["header_bytes"]
    for bit in range(8 * start, 8 * (len(blob) - 4)):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError, match="CRC"):
            codec.decode(bytes(bad))


@pytest.mark.parametrize("blob", VALID, ids=lambda b: f"{len(b)}B")
def test_truncation_at_every_offset(blob) -> None:
    for n in range(len(blob)):
        with pytest.raises(FormatError):
            codec.decode(blob[:n])
        with pytest.raises(FormatError):
            codec.inspect(blob[:n])


@pytest.mark.parametrize("extra", [b"\0", b"\xff", b"FCQT", bytes(1000)])
def test_trailing_bytes(extra) -> None:
    for blob in VALID[:5]:
        with pytest.raises(FormatError, match="trailing"):
            codec.decode(blob + extra)
        with pytest.raises(FormatError):
            codec.decode(reseal(blob[:-4] + extra + b"\0\0\0\0"))  # even with a valid CRC


def test_two_streams_back_to_back_are_not_one() -> None:
    with pytest.raises(FormatError):
        codec.decode(VALID[0] + VALID[0])


# ----------------------------------------------------------------------------- header fields


@pytest.mark.parametrize("kw, match", [
    ({"magic": b"FCQt"}, "magic"), ({"magic": b"\0\0\0\0"}, "magic"),
    ({"magic": b"TQCF"}, "magic"),
    ({"version": 0}, "version"), ({"version": 2}, "version"), ({"version": 255}, "version"),
    ({"method_id": 0}, "method"), ({"method_id": 6}, "method"), ({"method_id": 255}, "method"),
    ({"flags": 0x04}, "flag"), ({"flags": 0x80}, "flag"), ({"flags": 0xFF}, "flag"),
    ({"coding": 1}, "coding"), ({"coding": 255}, "coding"),
    ({"dtype_id": 0}, "dtype"), ({"dtype_id": 4}, "dtype"), ({"dtype_id": 255}, "dtype"),
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 255}, "bits"),
    ({"method": "symmetric", "bits": 1, "flags": FLAG_SIGNED}, "bits"),
    ({"method": "mulaw", "bits": 1, "flags": FLAG_SIGNED}, "bits"),
    ({"axis_byte": 2}, "axis"), ({"axis_byte": 64}, "axis"), ({"axis_byte": 0xFE}, "axis"),
    ({"shape": (), "axis_byte": 0}, "axis"),
    ({"ndim": 65, "shape": (1,) * 65}, "ndim"), ({"ndim": 255, "shape": (1,) * 255}, "ndim"),
])
def test_bad_header_fields(kw, match) -> None:
    blob = build(**kw)
    with pytest.raises(FormatError, match=match):
        codec.decode(blob)
    with pytest.raises(FormatError, match=match):
        codec.inspect(blob)


def test_header_field_boundaries_that_are_valid() -> None:
    assert codec.decode(build(ndim=64, shape=(1,) * 64)).shape == (1,) * 64
    assert codec.decode(build(shape=(), bits=1, zero_point=0)).shape == ()
    assert codec.decode(build("linear", bits=1, flags=FLAG_SIGNED, zero_point=0)).shape == (2, 3)
    assert codec.inspect(build("symmetric", bits=2, flags=FLAG_SIGNED | FLAG_RESTRICTED))[
        "restricted"] is True
    for dtype, i in DTYPE_IDS.items():
        assert codec.decode(build(dtype_id=i)).dtype == np.dtype(dtype)


def _shape_claiming(n_per_dim: int, ndim: int = 2) -> bytes:
    return b"".join(uleb(n_per_dim) for _ in range(ndim))


@pytest.mark.parametrize("max_elements", [None, 10**13])
@pytest.mark.parametrize("axis", [None, 0])
def test_a_trillion_element_header_fails_fast_without_allocating(max_elements, axis) -> None:
    shape = (10**6, 10**6)  # 10^12 elements, with a valid CRC
    # Per-channel, the header would next claim 10^6 scales: they are not there either.
    blob = build(shape=shape, axis=axis, payload=b"", params=None if axis is None else b"")
    kw = {} if max_elements is None else {"max_elements": max_elements}
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for fn in (codec.decode, codec.inspect, codec.decode_qtensor):
            with pytest.raises(FormatError):
                fn(blob, **kw)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes"
    assert elapsed < 0.5


def test_hostile_dimension_values() -> None:
    for shape_bytes in [uleb(2**63) + uleb(0), uleb(0) + uleb(2**69), b"\xff" * 9 + b"\x7f"]:
        blob = build(shape=(0, 0), shape_bytes=shape_bytes, payload=b"")
        with pytest.raises(FormatError):
            codec.decode(blob)


def test_varint_longer_than_ten_bytes() -> None:
    blob = build(shape=(1,), shape_bytes=b"\x81" + b"\x80" * 10 + b"\x00")
    with pytest.raises(FormatError, match="varint"):
        codec.decode(blob)


@pytest.mark.parametrize("where", ["shape", "payload"])
@pytest.mark.parametrize("encoding", [b"\x83\x00", b"\x83\x80\x00", b"\x80\x00"])
def test_non_minimal_varint(where, encoding) -> None:
    # 3 (or 0) with superfluous continuation bytes: a second spelling of the same header.
    value = 0 if encoding[0] == 0x80 else 3
    if where == "shape":
        shape = (value, 2)
        blob = build(shape=shape, shape_bytes=encoding + uleb(2))
    else:
        shape = (value, 8)  # 8·value bits: payload length == value bytes
        body = build(shape=shape, bits=1, zero_point=0)[:-4]
        head_len = len(body) - value - 1
        blob = seal(body[:head_len] + encoding + body[head_len + 1:])
    assert codec.decode(build(shape=shape, bits=1 if where == "payload" else 8,
                              zero_point=0)).shape == shape
    with pytest.raises(FormatError, match="non-minimal"):
        codec.decode(blob)


@pytest.mark.parametrize("delta", [-1, 1, 100, -6])
def test_payload_length_mismatch(delta) -> None:
    n = (2 * 3 * 8 + 7) // 8
    blob = build(payload_len=n + delta)  # payload bytes present as declared, CRC valid
    with pytest.raises(FormatError, match="payload length"):
        codec.decode(blob)
    with pytest.raises(FormatError):
        codec.inspect(blob)


@pytest.mark.parametrize("method, bad", [
    ("linear", {"scale": 0.0}), ("linear", {"scale": -0.0}), ("linear", {"scale": -1.0}),
    ("linear", {"scale": float("nan")}), ("linear", {"scale": float("inf")}),
    ("linear", {"zero_point": 256}), ("linear", {"zero_point": -1}),
    ("linear", {"zero_point": 32767}),
    ("symmetric", {"scale": 0.0}), ("symmetric", {"scale": float("nan")}),
    ("symmetric", {"scale": float("-inf")}),
    ("mulaw", {"mu": 0.0}), ("mulaw", {"mu": -1.0}), ("mulaw", {"mu": float("nan")}),
    ("mulaw", {"max_abs": 0.0}), ("mulaw", {"max_abs": float("inf")}),
    ("log", {"beta": 1.0}), ("log", {"beta": 0.5}), ("log", {"beta": float("nan")}),
    ("log", {"max_abs": -2.0}),
    ("exp", {"lam": 0.0}), ("exp", {"lam": -3.0}), ("exp", {"lam": float("nan")}),
    ("exp", {"max_abs": 0.0}),
])
@pytest.mark.parametrize("axis", [None, 1])
def test_invalid_parameters_in_a_crc_valid_stream(method, bad, axis) -> None:
    blob = build(method, (2, 3), 8, axis=axis, **bad)
    with pytest.raises(FormatError, match="invalid parameters"):
        codec.decode(blob)
    with pytest.raises(FormatError):
        codec.inspect(blob)


def test_signed_zero_point_range_is_checked_with_the_signed_flag() -> None:
    assert codec.decode(build(bits=4, flags=FLAG_SIGNED, zero_point=-8)) is not None
    with pytest.raises(FormatError):
        codec.decode(build(bits=4, flags=FLAG_SIGNED, zero_point=8))
    with pytest.raises(FormatError):
        codec.decode(build(bits=4, flags=0, zero_point=16))


def test_one_bad_channel_is_enough() -> None:
    params = struct.pack("<3f", 0.5, 0.0, 0.5) + struct.pack("<3h", 0, 0, 0)
    with pytest.raises(FormatError):
        codec.decode(build(shape=(2, 3), axis=1, params=params))


# ----------------------------------------------------------------------------- limits


def test_max_elements_is_honoured() -> None:
    blob = build(shape=(4, 25))
    assert codec.decode(blob, max_elements=100).shape == (4, 25)
    assert codec.inspect(blob, max_elements=100)["elements"] == 100
    for limit in (99, 25, 1, 0):
        with pytest.raises(FormatError):
            codec.decode(blob, max_elements=limit)
        with pytest.raises(FormatError):
            codec.inspect(blob, max_elements=limit)
        with pytest.raises(FormatError):
            codec.decode_qtensor(blob, max_elements=limit)
    # A zero-size tensor with one huge dimension still counts that dimension.
    with pytest.raises(FormatError):
        codec.decode(build(shape=(0, 10**9), payload=b""), max_elements=10**6)
    assert codec.decode(build(shape=(0, 10), payload=b""), max_elements=10).shape == (0, 10)


@pytest.mark.parametrize("method", list(METHOD_IDS))
@pytest.mark.parametrize("shape", [(1, 64, 112, 112), (8, 3, 16, 16), (1, 1, 1, 1)])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_per_tensor_4d_overhead_is_small(method, shape, bits) -> None:
    x = np.abs(np.random.default_rng(2).standard_normal(shape)).astype(np.float32)
    blob = codec.encode(x, method, bits)
    info = codec.inspect(blob)
    assert info["payload_bytes"] == (x.size * bits + 7) // 8
    assert len(blob) - info["payload_bytes"] <= 48
    assert info["total_bytes"] == len(blob)


# ----------------------------------------------------------------------------- inspect


INSPECT_FIELDS = {"format_version", "method", "bits", "signed", "restricted", "shape", "dtype",
                  "axis", "params", "elements", "header_bytes", "payload_bytes", "total_bytes",
                  "original_bytes", "ratio", "bits_per_element"}


def test_inspect_returns_the_documented_fields_without_decoding(monkeypatch) -> None:
    x = np.random.default_rng(4).standard_normal((3, 4, 5)).astype(np.float16)
    blob = codec.encode(x, "log", 5, axis=1)

    def boom(*a, **k):
        raise AssertionError("inspect must not decode the payload")

    monkeypatch.setattr(codec.api.bitpack, "unpack", boom)
    from codec.mappings.log import Log
    monkeypatch.setattr(Log, "dequantize", boom)
    info = codec.inspect(blob)
    assert set(info) == INSPECT_FIELDS
    assert info["format_version"] == 1
    assert info["method"] == "log" and info["bits"] == 5 and info["signed"] is True
    assert info["restricted"] is False
    assert info["shape"] == [3, 4, 5] and info["dtype"] == "float16" and info["axis"] == 1
    assert set(info["params"]) == {"beta", "max_abs"}
    assert len(info["params"]["beta"]) == 4 and all(b > 1 for b in info["params"]["beta"])
    assert info["elements"] == 60
    assert info["payload_bytes"] == (60 * 5 + 7) // 8
    assert info["total_bytes"] == len(blob) == info["header_bytes"] + info["payload_bytes"] + 4
    assert info["original_bytes"] == 120
    assert info["ratio"] == pytest.approx(120 / len(blob))
    assert info["bits_per_element"] == pytest.approx(8 * len(blob) / 60)
    # Plain Python values, JSON-friendly.
    import json
    assert json.loads(json.dumps(info)) == info
    with pytest.raises(AssertionError, match="must not decode"):
        codec.decode(blob)


def test_inspect_per_tensor_params_are_scalars() -> None:
    info = codec.inspect(codec.encode(np.linspace(-1, 2, 10, dtype=np.float32), "linear", 8))
    assert isinstance(info["params"]["scale"], float)
    assert isinstance(info["params"]["zero_point"], int)
    assert info["axis"] is None


def test_inspect_checks_the_crc() -> None:
    bad = bytearray(VALID[0])
    bad[-1] ^= 1
    with pytest.raises(FormatError, match="CRC"):
        codec.inspect(bytes(bad))


# ----------------------------------------------------------------------------- input types


@pytest.mark.parametrize("blob", ["FCQT", 123, None, 1.5, [1, 2, 3], object(), {"a": 1}])
def test_decode_of_a_non_bytes_object_is_a_type_error(blob) -> None:
    for fn in (codec.decode, codec.inspect, codec.decode_qtensor):
        with pytest.raises(TypeError):
            fn(blob)


def test_bytes_like_inputs_are_accepted() -> None:
    blob = VALID[0]
    want = codec.decode(blob)
    for b in (bytearray(blob), memoryview(blob), np.frombuffer(blob, np.uint8)):
        assert np.array_equal(codec.decode(b), want)
    padded = b"xx" + blob
    assert np.array_equal(codec.decode(memoryview(padded)[2:]), want)


# ----------------------------------------------------------------------------- fuzz


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_streams_only_raise_format_error(data) -> None:
    blob = data.draw(st.sampled_from(VALID), label="base")
    decode_only_raises_format_errors(mutate(data, blob))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=2000, deadline=None)
@given(blob=st.binary(max_size=120) | st.binary(max_size=60).map(lambda b: b"FCQT\x01" + b)
       | st.binary(max_size=60).map(lambda b: reseal(b"FCQT\x01" + b + b"\0\0\0\0")))
def test_fuzz_random_bytes_only_raise_format_error(blob) -> None:
    decode_only_raises_format_errors(blob)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=2000, deadline=None)
@given(method_id=st.integers(0, 7), flags=st.integers(0, 4), coding=st.integers(0, 1),
       dtype_id=st.integers(0, 4), bits=st.integers(0, 9),
       shape=st.lists(st.integers(0, 5), max_size=4), axis=st.integers(0, 5) | st.just(0xFF),
       params=st.none() | st.binary(max_size=40),
       values=st.lists(st.floats(width=32) | st.integers(-32768, 32767), min_size=2,
                       max_size=2),
       payload_delta=st.integers(-2, 2) | st.just(0), payload_seed=st.integers(0, 255))
def test_fuzz_structured_headers_only_raise_format_error(method_id, flags, coding, dtype_id,
                                                         bits, shape, axis, params, values,
                                                         payload_delta, payload_seed) -> None:
    names = {v: k for k, v in METHOD_IDS.items()}
    if params is None:  # well-formed parameters of (maybe) wrong values for the method
        method = names.get(method_id, "linear")
        channels = shape[axis] if axis < len(shape) else None
        out = b""
        for (name, fmt, per_channel), v in zip(STREAM_PARAMS[method], values * 2):
            count = channels if per_channel and channels is not None else 1
            if fmt == "h":
                v = v if isinstance(v, int) else 0
            else:
                v = float(v)
            out += struct.pack(f"<{count}{fmt}", *([v] * count))
        params = out
    n = (prod(shape) * max(bits, 0) + 7) // 8 + payload_delta
    payload = bytes((payload_seed * (i + 1)) & 0xFF for i in range(max(n, 0)))
    blob = build(shape=tuple(shape), method_id=method_id, flags=flags, coding=coding,
                 dtype_id=dtype_id, bits=bits, axis_byte=axis, params=params,
                 payload_len=max(n, 0), payload=payload)
    decode_only_raises_format_errors(blob)
