"""The lossless stage (codec/entropy.py): coding byte, rANS and zstd payloads, the gap to
the codes' entropy, the raw fallback, hostile payloads, and streams without the extra.

A pure-Python decoder written from docs/FORMAT.md ("Lossless stage") decodes the ANS
streams here, so the format is pinned independently of the library that writes it.
"""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec import FormatError, MissingExtraError, container, entropy
from conftest import peak_memory
from streams import decode_only_raises_format_errors, mutate, reseal

constriction = pytest.importorskip("constriction")
zstandard = pytest.importorskip("zstandard")

METHODS = ["linear", "symmetric", "mulaw", "log", "exp"]
ROOT = Path(__file__).resolve().parents[1]


def sources(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gauss": rng.standard_normal(n).astype(np.float32),
            "relu": np.maximum(rng.standard_normal(n), 0).astype(np.float32)}


def payload(blob: bytes) -> bytes:
    h = container.parse(blob)
    return blob[h.payload_offset: h.payload_offset + h.payload_size]


def rebuild(blob: bytes, coding: int | None = None, body: bytes | None = None) -> bytes:
    """The same stream with another coding byte and/or payload, with a valid CRC."""
    h = container.parse(blob)
    params = {k: v for k, v in h.params.items()}
    body = payload(blob) if body is None else body
    head = container.write_header(h.mapping, h.flags, h.coding if coding is None else coding,
                                  h.dtype, h.bits, h.shape, h.axis, params, len(body))
    return container.seal(head, body)


# ----------------------------------------------------------------------------- reference


def uleb(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def reference_symbols(body: bytes, n: int) -> list[int]:
    """docs/FORMAT.md, coder 1: the table, the 24-bit model, then rANS with a 64-bit state
    and 32-bit words read from the end of the payload."""
    lo, hi, p = body[0], body[1], body[2]
    pos, counts = 3, []
    for _ in range(hi - lo + 1):
        c, pos = uleb(body, pos)
        counts.append(c)
    assert sum(counts) == 1 << p
    if lo == hi:
        return [lo] * n
    w = [c << (24 - p) if c else 1 for c in counts]
    m = counts.index(max(counts))
    w[m] -= counts.count(0)
    cum = [0]
    for x in w:
        cum.append(cum[-1] + x)
    assert cum[-1] == 1 << 24
    words = list(struct.unpack(f"<{(len(body) - pos) // 4}I", body[pos:]))
    state = 0
    if words:
        state = words.pop()
        while words and state < 1 << 32:
            state = (state << 32) | words.pop()
    out = []
    for _ in range(n):
        q = state & ((1 << 24) - 1)
        s = next(i for i in range(len(w)) if cum[i] <= q < cum[i + 1])
        out.append(lo + s)
        state = (state >> 24) * w[s] + q - cum[s]
        if state < 1 << 32 and words:
            state = (state << 32) | words.pop()
    assert state == 0 and not words
    return out


def reference_codes(blob: bytes) -> np.ndarray:
    """Stored codes s ∈ [0, N) of a coder-1 stream, predictor undone per docs/FORMAT.md."""
    h = container.parse(blob)
    assert h.coding >> 4 == 1
    t = np.array(reference_symbols(payload(blob), h.size), np.int64).reshape(h.shape)
    n_levels = 1 << h.bits
    r = (t - n_levels // 2) % n_levels
    pred = h.coding & 0xF
    if pred == 0:
        return t
    if pred == 2:
        r = np.cumsum(r, axis=-2)
    return np.cumsum(r, axis=-1) % n_levels


def stored_codes(blob: bytes) -> np.ndarray:
    q = codec.decode_qtensor(blob)
    s = q.codes.astype(np.int64)
    return s + (1 << (q.bits - 1)) if q.signed else s


@pytest.mark.parametrize("method, bits, axis, pred, relu", [
    ("linear", 3, None, "none", False), ("exp", 5, 1, "lorenzo", True),
    ("symmetric", 8, 0, "delta", False), ("log", 2, None, "auto", True),
    ("mulaw", 6, 2, "lorenzo", False),
])
def test_reference_decoder_written_from_the_format_doc(method, bits, axis, pred, relu) -> None:
    x = np.cumsum(np.random.default_rng(bits).standard_normal((3, 4, 9, 11)), axis=-1)
    x = (np.maximum(x, 0) if relu else x).astype(np.float32)
    blob = codec.encode(x, method, bits, axis, entropy="ans", predictor=pred)
    assert blob[7] >> 4 == 1, "expected an ANS-coded stream"
    assert np.array_equal(reference_codes(blob), stored_codes(blob))


def test_model_weights_rule() -> None:
    w = entropy.weights(np.array([3, 0, 12, 0, 1]), 4)
    assert w.tolist() == [3 << 20, 1, (12 << 20) - 2, 1, 1 << 20] and w.sum() == 1 << 24


# ----------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coder", ["ans", "zstd"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_round_trip_equals_the_raw_stream(method, coder, dtype) -> None:
    rng = np.random.default_rng(5)
    x = rng.laplace(size=(2, 3, 16, 16)).astype(dtype)
    x[0, 1] = 0  # a dead channel: long runs
    for bits in range(1, 9):
        for signed in (None, True):
            try:
                raw = codec.encode(x, method, bits, axis=1, signed=signed)
            except ValueError:
                continue  # e.g. 1-bit signed codes
            blob = codec.encode(x, method, bits, axis=1, signed=signed, entropy=coder)
            got, want = codec.decode(blob), codec.decode(raw)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            q1, q2 = codec.decode_qtensor(blob), codec.decode_qtensor(raw)
            assert np.array_equal(q1.codes, q2.codes) and q1.codes.dtype == q2.codes.dtype
            assert len(blob) <= len(raw)
            info = codec.inspect(blob)
            if blob[7]:
                assert info["entropy"] == coder and info["packed_bytes"] == (
                    x.size * bits + 7) // 8 and info["payload_bytes"] < info["packed_bytes"]
                assert info["total_bytes"] == len(blob)
            else:
                assert "entropy" not in info and blob == raw


@pytest.mark.parametrize("name", ["gauss", "relu"])
@pytest.mark.parametrize("method", METHODS)
def test_ans_is_within_3_percent_of_the_zeroth_order_entropy(name, method) -> None:
    x = sources(1 << 18)[name]
    for bits in range(2, 9):
        q = codec.quantize(x, method, bits)
        counts = np.bincount(q.codes.view(np.uint8), minlength=256)
        pr = counts[counts > 0] / x.size
        h_bytes = float(-(pr * np.log2(pr)).sum()) * x.size / 8
        blob = codec.encode(x, method, bits, entropy="ans", predictor="none")
        info = codec.inspect(blob)
        size = info["payload_bytes"] if "entropy" in info else info["payload_bytes"]
        assert size <= 1.03 * h_bytes + 16, (name, method, bits, size, h_bytes)
        assert size <= (x.size * bits + 7) // 8


def test_incompressible_codes_fall_back_to_the_raw_stream() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, 4096).astype(np.float32)
    raw = codec.encode(x, "linear", 8)
    for coder in ("ans", "zstd", "auto"):
        assert codec.encode(x, "linear", 8, entropy=coder) == raw
    tiny = np.array([1.0, -2.0, 3.0], np.float32)  # the table costs more than 3 bytes
    assert codec.encode(tiny, "linear", 8, entropy="auto") == codec.encode(tiny, "linear", 8)
    empty = np.zeros((0, 3), np.float32)
    assert codec.encode(empty, "exp", 4, entropy="ans") == codec.encode(empty, "exp", 4)


def test_a_constant_tensor_codes_to_its_table() -> None:
    x = np.full((64, 64), 0.75, np.float32)
    blob = codec.encode(x, "linear", 8, entropy="ans")
    info = codec.inspect(blob)
    assert info["payload_bytes"] == 4 and info["entropy"] == "ans"
    assert np.array_equal(codec.decode(blob), x)


def test_auto_takes_zstd_where_runs_beat_a_zeroth_order_model() -> None:
    x = np.zeros((8, 64, 64), np.float32)
    x[:, :4, :4] = np.random.default_rng(1).standard_normal((8, 4, 4))
    blob = codec.encode(x, "linear", 8, entropy="auto", predictor="none")
    sizes = {c: len(codec.encode(x, "linear", 8, entropy=c, predictor="none"))
             for c in ("ans", "zstd")}
    assert len(blob) == min(sizes.values())
    assert codec.inspect(blob)["entropy"] == min(sizes, key=sizes.get)


def test_coding_byte_layout() -> None:
    x = np.cumsum(np.random.default_rng(2).standard_normal((4, 32, 32)), axis=-1)
    for coder, cid in (("ans", 1), ("zstd", 2)):
        for pred, pid in (("none", 0), ("delta", 1), ("lorenzo", 2)):
            blob = codec.encode(x, "linear", 6, entropy=coder, predictor=pred)
            assert blob[7] == (cid << 4) | pid, (coder, pred)
            info = codec.inspect(blob)
            assert (info["entropy"], info["predictor"]) == (coder, pred)


def test_encode_qtensor_takes_the_stage_too() -> None:
    x = sources(5000)["relu"].reshape(50, 100)
    q = codec.quantize(x, "exp", 4)
    blob = codec.encode_qtensor(q, entropy="ans")
    assert blob == codec.encode(x, "exp", 4, entropy="ans")
    assert codec.encode_qtensor(q) == codec.encode(x, "exp", 4)


def test_bad_entropy_values() -> None:
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="entropy must be"):
        codec.encode(x, "linear", 4, entropy="lzma")
    assert codec.encode(x, "linear", 4, entropy="none") == codec.encode(x, "linear", 4)


# ----------------------------------------------------------------------------- hostile input


def ans_stream() -> bytes:
    x = sources(4096, seed=7)["relu"].reshape(64, 64)
    blob = codec.encode(x, "linear", 4, entropy="ans", predictor="none")
    assert blob[7] == 0x10
    return blob


@pytest.mark.parametrize("coding, match", [
    (0x01, "predictor needs an entropy coder"), (0x02, "predictor needs"),
    (0x30, "coding 0x30"), (0xF0, "coding"), (0x13, "coding 0x13"), (0xFF, "coding"),
])
def test_invalid_coding_bytes(coding, match) -> None:
    blob = rebuild(ans_stream(), coding=coding)
    for fn in (codec.decode, codec.inspect):
        with pytest.raises(FormatError, match=match):
            fn(blob)


def test_lorenzo_needs_two_dimensions_in_the_stream() -> None:
    x = sources(4096)["relu"]
    blob = codec.encode(x, "linear", 4, entropy="ans")
    with pytest.raises(FormatError, match="ndim >= 2"):
        codec.decode(rebuild(blob, coding=0x12))


def test_a_coded_payload_must_be_smaller_than_the_packed_codes() -> None:
    blob = ans_stream()
    h = container.parse(blob)
    big = payload(blob) + bytes(h.packed_size)
    with pytest.raises(FormatError, match="not below"):
        codec.decode(rebuild(blob, body=big))


def _table(lo: int, hi: int, p: int, counts: list[int]) -> bytes:
    out = bytearray([lo, hi, p])
    for c in counts:
        while True:
            b, c = c & 0x7F, c >> 7
            out.append(b | (0x80 if c else 0))
            if not c:
                break
    return bytes(out)


@pytest.mark.parametrize("body, match", [
    (b"\x00\x01", "truncated ANS table"),
    (_table(0, 16, 4, [1] * 16 + [0]), "outside"),  # hi = 16 >= 2^4
    (_table(2, 1, 4, []), "outside"),
    (_table(0, 1, 25, [1 << 24, 1 << 24]), "precision"),
    (_table(0, 1, 4, [8, 7]), "sum to 15"),
    (_table(0, 1, 4, [8, 9]), "exceeds|sum"),
    (_table(0, 1, 4, [8]), "truncated"),
    (_table(0, 1, 4, [8, 8]) + b"\x01\x00\x00", "whole number"),
    (_table(0, 1, 4, [8, 8]) + b"\x01\x00\x00\x00\x00\x00\x00\x00", "zero word|ANS"),
    (_table(3, 3, 0, [1]) + b"\x00\x00\x00\x01", "one-symbol"),
    (b"\x00\x01\x04\x88\x00\x08", "non-minimal"),
])
def test_hostile_ans_payloads(body, match) -> None:
    blob = rebuild(ans_stream(), body=body)
    for fn in (codec.decode, codec.inspect):
        with pytest.raises(FormatError, match=match):
            fn(blob)


def test_ans_data_left_over_after_the_last_code() -> None:
    blob = ans_stream()
    body = payload(blob)
    pos = 3
    for _ in range(body[1] - body[0] + 1):
        pos = uleb(body, pos)[1]
    extra = body[:pos] + b"\x07\x00\x00\x00" * 3 + body[pos:]  # words below the stack
    for fn in (codec.decode, codec.inspect):
        with pytest.raises(FormatError, match="left over"):
            fn(rebuild(blob, body=extra))


def zstd_stream() -> bytes:
    x = np.zeros((64, 64), np.float32)
    x[0, :5] = [1, 2, 3, 4, 5]
    blob = codec.encode(x, "linear", 8, entropy="zstd", predictor="none")
    assert blob[7] == 0x20
    return blob


def test_zstd_bomb_with_a_content_size_is_refused_before_decompressing() -> None:
    big = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 26))  # 64 MiB of zeros
    assert len(big) < 4096
    blob = rebuild(zstd_stream(), body=big)
    peak, error = peak_memory(codec.decode, blob)
    assert isinstance(error, FormatError) and "declares 67108864 bytes" in str(error)
    assert peak < 4 << 20


def test_zstd_bomb_without_a_content_size_stops_at_the_element_count() -> None:
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=False)
    big = cctx.compress(bytes(1 << 26))
    blob = rebuild(zstd_stream(), body=big)
    peak, error = peak_memory(codec.decode, blob)
    assert isinstance(error, FormatError) and "zstd" in str(error)
    assert peak < 4 << 20


@pytest.mark.parametrize("body, match", [
    (b"not a zstd frame at all", "invalid zstd frame"),
    (zstandard.ZstdCompressor().compress(bytes(4095)), "declares 4095"),
    (zstandard.ZstdCompressor().compress(bytes(4096)) + b"\0", "invalid zstd payload"),
    (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4095)), "holds 4095"),
])
def test_hostile_zstd_payloads(body, match) -> None:
    blob = rebuild(zstd_stream(), body=body)
    for fn in (codec.decode, codec.inspect):
        with pytest.raises(FormatError, match=match):
            fn(blob)


def test_zstd_codes_beyond_the_bit_width_are_refused() -> None:
    x = np.zeros((64, 64), np.float32)
    x[0, :3] = [1, 2, 3]
    base = codec.encode(x, "linear", 4, entropy="zstd", predictor="none")
    assert base[7] == 0x20
    body = zstandard.ZstdCompressor().compress(bytes([16]) * 4096)
    with pytest.raises(FormatError, match="code >= 2\\^4"):
        codec.decode(rebuild(base, body=body))


def test_element_limit_applies_before_any_decoding() -> None:
    blob = ans_stream()
    with pytest.raises(FormatError, match="more than 100 elements"):
        codec.decode(blob, max_elements=100)


CODED = [ans_stream(), zstd_stream(),
         codec.encode(np.cumsum(np.random.default_rng(3).standard_normal((3, 20, 20)), -1)
                      .astype(np.float32), "exp", 5, axis=0, entropy="ans",
                      predictor="lorenzo")]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_coded_streams_only_raise_format_error(data) -> None:
    # always resealed: past the CRC, into the entropy decoders
    decode_only_raises_format_errors(reseal(mutate(data, data.draw(st.sampled_from(CODED)))))


# ----------------------------------------------------------------------------- without the extra


@pytest.fixture
def no_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "zstandard", None)


def test_without_the_extra(no_extra) -> None:
    x = sources(4096)["relu"].reshape(64, 64)
    coded = CODED[:2]  # made before the extra went away
    raw = codec.encode(x, "exp", 4)
    assert codec.decode(raw).shape == (64, 64)  # raw streams: numpy alone
    assert codec.encode(x, "exp", 4, entropy="auto") == raw  # auto: the best installed = none
    for blob, module in zip(coded, ("constriction", "zstandard")):
        with pytest.raises(MissingExtraError, match=r"featcodec\[entropy\]") as err:
            codec.decode(blob)
        assert err.value.extra == "entropy" and err.value.module == module
        info = codec.inspect(blob)  # the header is still readable
        assert info["missing_extra"] == "entropy" and info["entropy"] in ("ans", "zstd")
    for coder, module in (("ans", "constriction"), ("zstd", "zstandard")):
        with pytest.raises(MissingExtraError, match=module):
            codec.encode(x, "exp", 4, entropy=coder)


def test_format_doc_lossless_example_is_what_encode_writes() -> None:
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    section = doc.split("## Worked example with the lossless stage", 1)[1]
    expected = bytes.fromhex(section.split("```")[1].strip())
    x = np.zeros((8, 8), np.float32)
    x[2, 3], x[5, 6] = 1.0, 0.5
    assert codec.encode(x, "linear", 2, entropy="ans") == expected
    assert np.array_equal(codec.decode(expected),
                          codec.decode(codec.encode(x, "linear", 2)))
