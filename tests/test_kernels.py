"""Fast kernels against plain numpy reference implementations: identical codes.

Every fast path (the magic-number uniform quantizer, the fused min/max, the
code tables and counted steps of the companders, the block-wise table lookup,
the fused signed offset of the bit packer) must give exactly what a straightforward whole-array
numpy expression gives, for every method, bit width, sign and axis, and on
sizes around every block boundary. Block sizes are shrunk here so that small
tensors cross many of them. No timing is asserted: bench/ reports speed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import pytest

import codec
from codec import bitpack, pipeline
from codec.mappings import blocks, compander, get, steps, uniform
from codec.outbytes import OutBytes
from test_roundtrip import bcast
from codec.mappings.base import code_range

METHODS = ("linear", "symmetric", "mulaw", "log", "exp")
COMPANDERS = ("mulaw", "log", "exp")
F32 = np.finfo(np.float32)


# --- plain references ---------------------------------------------------------


def ref_uniform_quantize(x, scale, zp, lo, hi, axis, dtype):
    """ONNX QuantizeLinear in one expression: divide, round half to even, add z, clamp."""
    s = bcast(np.asarray(scale, np.float32), x.ndim, axis)
    z = bcast(np.asarray(zp).astype(np.float32), x.ndim, axis)
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.rint((x / s).astype(np.float32)) + z
    return np.clip(t, lo, hi).astype(dtype)


def ref_uniform_dequantize(codes, scale, zp, axis):
    s = bcast(np.asarray(scale, np.float32), codes.ndim, axis)
    z = bcast(np.asarray(zp).astype(np.int16), codes.ndim, axis)
    return np.multiply(codes.astype(np.int16) - z, s, dtype=np.float32)


def ref_compander_quantize(mapping, x, bits, axis, signed, params):
    """The companding quantizer of docs/CODECS.md on the whole array at once."""
    top = (1 << bits) - 1
    p = {k: bcast(v, x.ndim, axis) for k, v in params.items()}
    with np.errstate(all="ignore"):
        if mapping.name == "log":
            from codec.mappings.log import _index, _magnitudes
            m = _magnitudes(bits, signed)
            a = np.abs(x)
            k = _index(a, np.log(p["max_abs"].astype(np.float64)),
                       np.log(p["beta"].astype(np.float64)), m, np.empty_like(a))
            k = np.copysign(k, x)
            return (k if signed else np.maximum(k, 0)).astype(np.int8 if signed else np.uint8)
        t = np.abs(x)
        mapping.compress(t, p)
        t = np.copysign(np.clip(t, 0.0, 1.0), x)
        if signed:
            t = np.rint((t + np.float32(1.0)) * np.float32(top / 2)) - (1 << (bits - 1))
            return t.astype(np.int8)
        return np.rint(np.maximum(t, np.float32(0)) * np.float32(top)).astype(np.uint8)


def ref_lookup(lut, codes, bits, signed, axis):
    idx = codes.view(np.uint8).astype(np.int64)
    if signed:
        idx = (idx + (1 << (bits - 1))) & ((1 << bits) - 1)
    if lut.shape[0] == 1:
        return lut[0][idx]
    ch = np.arange(codes.shape[axis]).reshape([-1 if i == axis else 1
                                               for i in range(codes.ndim)])
    return lut[np.broadcast_to(ch, codes.shape), idx]


def ref_pack(codes: np.ndarray, bits: int, signed: bool = False) -> bytes:
    """The stream as a bit matrix: row i is code i's bits, LSB first."""
    u = codes.reshape(-1).view(np.uint8).astype(np.int64)
    if signed:
        u = (u + (1 << (bits - 1))) & ((1 << bits) - 1)
    matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1), bitorder="little").tobytes()


# --- data -----------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Blocks and stream segments of 64 elements (and code tables from 100 elements on)."""
    monkeypatch.setattr(blocks, "CHUNK", 64)
    monkeypatch.setattr(blocks, "_REDUCE_CHUNK", 64)
    monkeypatch.setattr(blocks, "_TABLE_STEP", 64)
    monkeypatch.setattr(uniform, "CHUNK", 64)
    monkeypatch.setattr(uniform, "HOT_CHUNK", 64)
    monkeypatch.setattr(pipeline, "SEGMENT", 64)
    monkeypatch.setattr(pipeline._FieldTable, "_BLOCK", 5)
    monkeypatch.setattr(pipeline._FieldTable, "PAIR_MIN_CODES_PER_ENTRY", 0)
    monkeypatch.setattr(pipeline._FieldTable, "PAIR_MIN_CODES_LINEAR", 0)
    monkeypatch.setattr(compander, "CHUNK", 64)
    monkeypatch.setattr(compander, "LUT_MIN_SIZE", 100)
    monkeypatch.setattr(compander, "_STEPS_MIN_RATIO", 0)  # counted steps at any size
    monkeypatch.setattr(steps, "CHUNK", 64)
    monkeypatch.setattr(steps, "_FLAGS_BYTES", 1000)
    monkeypatch.setattr(bitpack, "_CHUNK", 64)
    yield 64


def data(rng: np.random.Generator, shape: tuple[int, ...], special: bool = True
         ) -> np.ndarray:
    x = (rng.laplace(size=shape) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    flat = x.reshape(-1)
    if special and flat.size > 16:
        i = rng.choice(flat.size, 8, replace=False)
        flat[i] = [0.0, -0.0, F32.smallest_subnormal, -F32.smallest_subnormal,
                   F32.tiny, 1e-30, -1e-30, 0.5]
        flat[::17] = np.rint(flat[::17])  # integers...
        flat[::19] = np.rint(flat[::19]) + 0.5  # ...and exact ties for power-of-2 steps
    return x


# Sizes around the shrunk block of 64 (and the bit packer's quantum of 8).
SIZES = [1, 7, 63, 64, 65, 127, 129, 200, 1000]
SHAPES = [(1000,), (3, 5, 67), (2, 64, 3), (4, 33), (1, 16, 7, 7)]


def axes(shape: tuple[int, ...]) -> list[int | None]:
    return [None] + sorted({0, len(shape) - 1, 1 % len(shape)})


# --- uniform quantizer ------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_uniform_quantize_matches_reference(small_blocks, bits: int, signed: bool) -> None:
    rng = np.random.default_rng(bits * 2 + signed)
    lo, hi = code_range(bits, signed)
    dtype = np.int8 if signed else np.uint8
    for shape in SHAPES + [(n,) for n in SIZES]:
        x = data(rng, shape)
        for axis in axes(shape):
            n = None if axis is None else shape[axis]
            pow2 = rng.integers(0, 2)
            if pow2:  # exact ties
                scale = (2.0 ** rng.integers(-3, 3, () if n is None else n)).astype(np.float32)
            else:
                scale = rng.uniform(1e-3, 3, () if n is None else n).astype(np.float32)
            zp = rng.integers(lo, hi + 1, () if n is None else n).astype(np.int16)
            for extreme in (False, True):
                xx = x.copy()
                if extreme and xx.size > 4:
                    xx.reshape(-1)[:4] = [np.inf, -np.inf, F32.max, -F32.max]
                got = uniform.quantize(xx, scale, zp, lo, hi, axis, np.dtype(dtype))
                want = ref_uniform_quantize(xx, scale, zp, lo, hi, axis, dtype)
                np.testing.assert_array_equal(got, want, err_msg=f"{shape} axis={axis}")
            codes = got
            np.testing.assert_array_equal(
                uniform.dequantize(codes, scale, zp, axis).view(np.uint32),
                ref_uniform_dequantize(codes, scale, zp, axis).view(np.uint32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_known_range_skips_only_a_clamp_that_changes_nothing(small_blocks, bits: int,
                                                             signed: bool) -> None:
    """x_range lets the kernel drop the clamp when the extremes' quotients are in bounds;
    the codes must be the reference's whether the clamp was needed or not."""
    rng = np.random.default_rng(bits + 10 * signed)
    lo, hi = code_range(bits, signed)
    dtype = np.int8 if signed else np.uint8
    for n in SIZES:
        x = data(rng, (n,))
        amax = float(np.max(np.abs(x))) or 1.0
        for scale in (amax / (hi - lo) * 2.01, amax / (hi - lo) / 3, amax / 2 ** 0.5,
                      2.0 ** np.round(np.log2(amax / hi))):
            scale = np.float32(scale)
            for zp in {lo, (lo + hi) // 2, hi, (lo + hi + 1) // 2}:
                z = np.array(zp, np.int16)
                want = ref_uniform_quantize(x, scale, z, lo, hi, None, dtype)
                got = uniform.quantize(x, scale, z, lo, hi, None, np.dtype(dtype),
                                       x_range=(float(x.min()), float(x.max())))
                np.testing.assert_array_equal(got, want, err_msg=f"n={n} s={scale} z={zp}")
    y = np.array([np.inf, -np.inf, 1.0, -2.5, 0.5], np.float32)  # given scale saturates
    want = ref_uniform_quantize(y, np.float32(1), np.int16(0), lo, hi, None, dtype)
    got = uniform.quantize(y, np.float32(1), np.int16(0), lo, hi, None, np.dtype(dtype),
                           x_range=(-np.inf, np.inf))
    np.testing.assert_array_equal(got, want)


def test_uniform_odd_and_even_zero_points_per_channel(small_blocks) -> None:
    rng = np.random.default_rng(7)
    x = data(rng, (6, 50))
    scale = np.full(6, 0.5, np.float32)  # ties everywhere x is a multiple of 0.25
    x[:, ::2] = np.rint(x[:, ::2] * 4) / 4
    for zp in ([0, 1, 2, 3, 254, 255], [2, 4, 6, 8, 10, 12], [1, 3, 5, 7, 9, 11]):
        z = np.array(zp, np.int16)
        got = uniform.quantize(x, scale, z, 0, 255, 0, np.dtype(np.uint8))
        np.testing.assert_array_equal(got, ref_uniform_quantize(x, scale, z, 0, 255, 0,
                                                                np.uint8))


@pytest.mark.parametrize("method, restricted",
                         [("linear", False), ("symmetric", False), ("symmetric", True)])
@pytest.mark.parametrize("signed", [False, True])
def test_uniform_stored_bytes_fold_the_offset_into_z(small_blocks, method: str,
                                                     restricted: bool, signed: bool) -> None:
    """8-bit streams hold signed codes + 128; linear and symmetric fold that offset into
    the zero point instead of flipping the top bit in a pass of their own. The stored
    bytes must be the reference codes + 128 and decode to the reference values, at every
    zero point (odd, even, both ends), with ties, saturation and per-channel rows."""
    mapping = get(method)
    rng = np.random.default_rng(5 + signed + 2 * restricted)
    lo, hi = code_range(8, signed)
    lo += int(restricted and signed)
    dtype = np.int8 if signed else np.uint8
    off = 128 if signed else 0
    for shape in SHAPES + [(n,) for n in SIZES]:
        x = data(rng, shape)
        if x.size > 2:  # saturating codes at both ends
            x.reshape(-1)[:2] = [F32.max, -F32.max]
        for axis in axes(shape):
            n = None if axis is None else shape[axis]
            scale = (2.0 ** rng.integers(-3, 3, () if n is None else n)).astype(np.float32)
            zps = [np.zeros((), np.int16)] if method == "symmetric" else [
                rng.integers(lo, hi + 1, () if n is None else n).astype(np.int16),
                np.full(() if n is None else n, lo, np.int16),
                np.full(() if n is None else n, hi, np.int16)]
            for zp in zps:
                params = {"scale": scale} if method == "symmetric" else \
                    {"scale": scale, "zero_point": zp}
                for x_range in (None, (float(x.min()), float(x.max()))):
                    stored = np.empty(shape, np.uint8)
                    mapping.quantize_stored(x, axis, signed, params, restricted, stored,
                                            x_range if axis is None else None)
                    want = ref_uniform_quantize(x, scale, zp, lo, hi, axis, dtype)
                    np.testing.assert_array_equal(
                        stored, (want.astype(np.int16) + off).astype(np.uint8),
                        err_msg=f"{shape} axis={axis}")
                out = np.empty(shape, np.float32)
                mapping.dequantize_stored(stored, axis, signed, params, out, None)
                np.testing.assert_array_equal(
                    out.view(np.uint32),
                    ref_uniform_dequantize(want, scale, zp, axis).view(np.uint32))


# --- min / max ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(n,) for n in SIZES] + [(2, 3, 200), (300, 2)])
def test_min_max_matches_reference(small_blocks, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x = data(rng, shape)
    for axis in axes(shape):
        red = None if axis is None else tuple(i for i in range(x.ndim) if i != axis)
        mn, mx = blocks.min_max(x, axis)
        np.testing.assert_array_equal(mn, np.min(x, axis=red).astype(np.float64))
        np.testing.assert_array_equal(mx, np.max(x, axis=red).astype(np.float64))
        if axis is not None:  # the same from the input check's note, made in its one pass
            assert blocks.checked_range(x, axis=axis) == (x.min(), x.max())
            mn, mx = blocks.min_max(x, axis)
            np.testing.assert_array_equal(mn, np.min(x, axis=red).astype(np.float64))
            np.testing.assert_array_equal(mx, np.max(x, axis=red).astype(np.float64))
    y = x.copy()
    y.reshape(-1)[y.size // 2] = np.nan
    assert np.isnan(blocks.checked_range(y)[0]) and np.isnan(blocks.checked_range(y)[1])
    for axis in axes(shape)[1:]:
        assert all(np.isnan(v) for v in blocks.checked_range(y, axis=axis))


def test_noted_range_is_used_once_and_only_for_its_array() -> None:
    x = np.arange(10, dtype=np.float32)
    lo, hi = blocks.checked_range(x)
    assert (lo, hi) == (0, 9)
    x[3] = 100  # mutated after the check: a fit of it must scan again...
    blocks.checked_range(x)
    assert blocks.min_max(x, None)[1] == 100
    x[4] = 200  # ...and a note serves one fit only
    assert blocks.min_max(x, None)[1] == 200
    y = x.copy()
    blocks.checked_range(x)
    y[0] = -5
    assert blocks.min_max(y, None)[0] == -5  # another array never takes x's note


def test_noted_channel_ranges_are_used_once_and_only_for_their_axis(monkeypatch) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    blocks.checked_range(x, axis=0)
    x[0, 0] = -7  # mutated after the check: the note is stale, used once, then gone
    np.testing.assert_array_equal(blocks.min_max(x, 0)[0], [0, 4, 8])
    np.testing.assert_array_equal(blocks.min_max(x, 0)[0], [-7, 4, 8])
    blocks.checked_range(x, axis=0)
    np.testing.assert_array_equal(blocks.min_max(x, 1)[0], [-7, 1, 2, 3])  # other axis
    assert blocks.min_max(x, None) == (-7, 11)  # the tensor's range is noted too
    scans = []
    real = blocks._axis_min_max
    monkeypatch.setattr(blocks, "_axis_min_max", lambda *a: scans.append(1) or real(*a))
    for method in ("linear", "symmetric", "mulaw"):
        scans.clear()
        codec.encode(data(np.random.default_rng(1), (2, 8, 33)), method, 5, axis=1)
        assert len(scans) == 1, method  # a per-channel encode reads its input once to fit


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 70_000, 200_001])
def test_fused_abs_sum_gives_the_bits_of_mean_abs(n: int) -> None:
    """The input check sums |x| in its own pass for exp's fit: λ must not move by a bit."""
    rng = np.random.default_rng(n)
    x = data(rng, (n,))
    want = blocks.mean_abs(x, None)
    blocks.checked_range(x, abs_sum=True)
    got = blocks.mean_abs(x, None)
    assert got.view(np.uint64) == want.view(np.uint64)
    assert blocks.min_max(x, None) == (x.min(), x.max())  # the range is still noted...
    x[0] = 1e6
    assert blocks.mean_abs(x, None) > want  # ...and the sum is used once


def test_encode_after_in_place_mutation_sees_new_range() -> None:
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    codec.encode(x, "linear", 8, scale=0.01)  # notes a range its fit does not consume
    x *= 10
    q = codec.decode_qtensor(codec.encode(x, "linear", 8))
    assert np.isclose(float(q.scale) * 255, 20, rtol=0.01)
    y = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(4, 250)
    codec.encode(y, "linear", 8, axis=0, scale=[0.01] * 4)  # per-channel note, not consumed
    y *= 10
    assert codec.encode(y, "linear", 8, axis=0) == codec.encode(y.copy(), "linear", 8, axis=0)



_EDGE_CHANNELS = [
    [0.0, 0.0], [-0.0, 0.0], [-0.0, 1.5], [2.5, 2.5], [-2.5, -2.5], [-3.0, -1.0], [1.0, 7.0],
    [-F32.max, F32.max], [F32.max, F32.max], [-F32.max, -F32.max], [0.0, F32.max],
    [F32.smallest_subnormal, F32.smallest_subnormal], [-F32.tiny, 0.0], [-1e-30, 1e30],
    [-1.0, 254.0], [-254.0, 1.0], [-0.5, 0.5], [-1.0, 1.0 + 2 ** -23],
]


@pytest.mark.parametrize("method", ["linear", "symmetric"])
def test_per_tensor_fit_on_floats_equals_per_channel_fit(method: str) -> None:
    """Per-tensor ranges are fitted on Python floats (FloatOps), per-channel ones on numpy
    arrays: every channel fitted alone must get exactly its per-channel parameters."""
    rng = np.random.default_rng(11)
    chans = [np.array(c, np.float32) for c in _EDGE_CHANNELS]
    for _ in range(300):
        lo, hi = np.sort(rng.laplace(size=2) * 10.0 ** rng.uniform(-30, 30))
        chans.append(np.array([lo, hi], np.float32))
    x = np.stack(chans)  # (channels, 2): each channel is its own min and max
    mapping = get(method)
    for bits in range(1, 9):
        for signed in (False, True):  # (signed=None is decided for the whole tensor)
            if method == "symmetric" and signed and bits == 1:
                continue
            _, per_channel = mapping.fit(x, bits, 0, signed, {})
            for c, row in enumerate(x):
                s, alone = mapping.fit(row, bits, None, signed, {})
                for name, v in alone.items():
                    assert v.shape == () and v.dtype == per_channel[name].dtype
                    assert v.tobytes() == per_channel[name][c].tobytes(), (bits, signed, row)


# --- companders ------------------------------------------------------------------------


def _params(name: str, x: np.ndarray, bits: int, axis: int | None, signed: bool):
    mapping = get(name)
    lo, hi = mapping.bit_range(signed)
    if not lo <= bits <= hi:
        return None
    return mapping, *mapping.fit(x, bits, axis, signed, {})


@pytest.mark.parametrize("name", COMPANDERS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_compander_codes_match_reference(small_blocks, name: str, bits: int,
                                         signed: bool) -> None:
    rng = np.random.default_rng(bits * 7 + signed)
    for shape in [(1000,), (3, 5, 67), (4, 33), (129,)]:
        x = data(rng, shape)
        if not signed and rng.integers(0, 2):
            x = np.abs(x)
        for axis in axes(shape):
            fitted = _params(name, x, bits, axis, signed)
            if fitted is None:
                return
            mapping, is_signed, params = fitted
            xx = x.copy()
            xx.reshape(-1)[:3] = [np.inf, -np.inf, -F32.max]  # saturate like the reference
            got = mapping.quantize(xx, bits, axis, is_signed, params)
            want = ref_compander_quantize(mapping, xx, bits, axis, is_signed, params)
            np.testing.assert_array_equal(got, want, err_msg=f"{shape} axis={axis}")
            lut = mapping.table(bits, is_signed, params)
            np.testing.assert_array_equal(
                mapping.dequantize(got, bits, axis, is_signed, params),
                ref_lookup(lut, got, bits, is_signed, axis))


@pytest.mark.parametrize("name", COMPANDERS)
@pytest.mark.parametrize("bits", range(1, steps.STEPS_MAX_BITS + 1))
@pytest.mark.parametrize("signed", [False, True])
def test_counted_steps_give_the_reference_codes(small_blocks, monkeypatch: pytest.MonkeyPatch,
                                                name: str, bits: int, signed: bool) -> None:
    """Codes counted from each channel's steps, per tensor and per channel (μ-law's
    channels share a table instead, where μ/r is a normal float32), on blocks of one row and of many, with ±inf,
    ±FLT_MAX, signed zeros, subnormals and exact ties."""
    mapping = get(name)
    if not mapping.bit_range(signed)[0] <= bits:
        return
    counted = []
    apply = steps.Steps.apply
    monkeypatch.setattr(steps.Steps, "apply",
                        lambda self, x, *a: counted.append(x.size) or apply(self, x, *a))
    rng = np.random.default_rng(bits * 5 + signed)
    for shape in [(1000,), (3, 5, 67), (2, 64, 3), (1, 16, 7, 7), (5, 200)]:
        x = data(rng, shape)
        if not signed and rng.integers(0, 2):
            x = np.abs(x)
        for axis in axes(shape):
            _, params = mapping.fit(x, bits, axis, signed, {})
            xx = x.copy()
            xx.reshape(-1)[:4] = [np.inf, -np.inf, -F32.max, F32.max]  # saturate
            before = len(counted)
            got = mapping.quantize(xx, bits, axis, signed, params)
            np.testing.assert_array_equal(
                got, ref_compander_quantize(mapping, xx, bits, axis, signed, params),
                err_msg=f"{shape} axis={axis}")
            per_channel = axis is not None and any(np.ndim(v) for v in params.values())
            shared = per_channel and mapping.input_scale(params) is not None
            assert (len(counted) > before) != shared


def _two_step_rows(v: np.ndarray) -> np.ndarray:
    """A monotone quantizer per row: row 0 steps at 1 and 2; row 1 jumps two codes at 0
    (two equal steps); row 2 never steps (padded)."""
    out = np.zeros(v.shape, np.int64)
    out[0] = (v[0] >= 1).astype(int) + (v[0] >= 2) - 1
    out[1] = np.where(v[1] >= 0, 1, -1)
    out[2] = 3
    return out


@pytest.mark.parametrize("guess", [None, "good", "far", "nan"])
def test_steps_found_whatever_the_guess(guess: str | None) -> None:
    """Rows with different numbers of steps, a jump of two codes at one value, and a
    guess that is close, far off or NaN: the same exact steps (a guess only saves time)."""
    g = {None: None,
         "good": np.array([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]),
         "far": np.array([[-3e38, 1e-40], [7.0, -7.0], [1.0, 2.0]]),
         "nan": np.full((3, 2), np.nan)}[guess]
    st = steps.Steps.build(_two_step_rows, 3, np.dtype(np.int8), g)
    assert st is not None
    np.testing.assert_array_equal(st.base, [-1, -1, 3])
    np.testing.assert_array_equal(st.thr[:, :2], [[1.0, 0.0], [2.0, 0.0]])
    assert np.isnan(st.thr[:, 2]).all()
    probe = np.float32([-np.inf, -F32.max, -1.0, -0.0, 0.0, 1e-45, 0.5, 1.0, 1.5, 2.0,
                        np.nextafter(np.float32(2), np.float32(0)), 3e38, np.inf])
    rows = np.tile(probe, (3, 1))
    np.testing.assert_array_equal(st.apply(rows, 0), _two_step_rows(rows))


def test_steps_refuse_what_they_cannot_hold() -> None:
    assert steps.Steps.build(lambda v: (v >= 1).astype(np.int64) * 300, 1,
                             np.dtype(np.uint8)) is None  # codes beyond the output type
    assert steps.Steps.build(lambda v: -(v >= 1).astype(np.int64), 1,
                             np.dtype(np.int8)) is None  # decreasing
    dip = np.nextafter(np.float32(1), np.float32(2))
    assert steps.Steps.build(lambda v: ((v >= 1) & (v != dip)).astype(np.int64), 1,
                             np.dtype(np.uint8)) is None  # not monotone next to its step


def test_per_tensor_steps_are_found_once_for_all_segments(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(compander, "_TABLES", {})
    monkeypatch.setattr(pipeline, "SEGMENT", 1 << 16)
    builds = []
    build = steps.Steps.build
    monkeypatch.setattr(steps.Steps, "build",
                        lambda *a, **k: builds.append(1) or build(*a, **k))
    x = data(np.random.default_rng(3), (1, 8, 160, 160))
    for name in COMPANDERS:
        builds.clear()
        blob = codec.encode(x, name, 4)
        assert len(builds) == 1, name  # 4 segments
        mapping = get(name)
        q = codec.quantize(x, name, 4)
        params = {p.name: q.param(p.name) for p in mapping.params}
        np.testing.assert_array_equal(
            codec.decode(blob), mapping.dequantize(
                ref_compander_quantize(mapping, x, 4, None, q.signed, params), 4, None,
                q.signed, params))


@pytest.mark.parametrize("name", COMPANDERS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_table_at_its_own_steps(name: str, bits: int) -> None:
    """Every step of the table, both of its float32 neighbours and every bucket edge."""
    rng = np.random.default_rng(bits)
    x = data(rng, (5000,))
    for signed in (False, True):
        fitted = _params(name, x, bits, None, signed)
        if fitted is None:
            continue
        mapping, is_signed, params = fitted
        dtype = np.dtype(np.int8 if is_signed else np.uint8)
        table = blocks.CodeTable.build(
            lambda v: mapping._quantize_direct(v, bits, None, is_signed, params), dtype)
        assert table is not None
        steps = table.thr[np.isfinite(table.thr)]
        edges = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
        edges = edges[np.isfinite(edges)]
        probe = np.concatenate([steps, np.nextafter(steps, -np.inf), np.nextafter(steps, np.inf),
                                edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
                                np.float32([0.0, -0.0, np.inf, -np.inf])]).astype(np.float32)
        probe = probe[~np.isnan(probe)]
        want = ref_compander_quantize(mapping, probe, bits, None, is_signed, params)
        np.testing.assert_array_equal(table.quantize(probe, dtype), want)
        keep = probe >= 0  # -0.0 too: the path for tensors with nothing below zero
        np.testing.assert_array_equal(table.quantize(probe[keep], dtype, nonneg=True),
                                      want[keep])


@pytest.mark.parametrize("bits", [4, 6])
def test_large_tensors_get_the_reference_codes(bits: int) -> None:
    """Counted steps at 4 bits, a code table at 6 (its ``nonneg`` path with x_range)."""
    x = data(np.random.default_rng(0), (blocks.LUT_MIN_SIZE + 3,))
    relu = np.maximum(x, 0)
    relu[::7] = -0.0  # no value below zero, but sign bits set
    for name in COMPANDERS:
        for v, signed in ((x, True), (relu, True), (relu, False)):
            fitted = _params(name, v, bits, None, signed)
            if fitted is None:
                continue
            mapping, is_signed, params = fitted
            want = ref_compander_quantize(mapping, v, bits, None, is_signed, params)
            np.testing.assert_array_equal(mapping.quantize(v, bits, None, is_signed, params),
                                          want)
            x_range = (float(v.min()), float(v.max()))
            np.testing.assert_array_equal(
                mapping.quantize(v, bits, None, is_signed, params, x_range=x_range), want)


@pytest.fixture
def fresh_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No code table built or pending yet, and tables worth building from 1000 elements."""
    monkeypatch.setattr(compander, "_TABLES", {})
    monkeypatch.setattr(compander, "_PENDING", {})
    monkeypatch.setattr(compander, "LUT_MIN_SIZE", 1000)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_mulaw_codes_of_every_channel_come_from_one_shared_table(
        fresh_tables, monkeypatch: pytest.MonkeyPatch, bits: int, signed: bool) -> None:
    """μ-law codes are one step function of x·μ/r: one table, built once for μ, codes
    every channel and every tensor (per-tensor ones below the size of their own table)."""
    mapping = get("mulaw")
    if not mapping.bit_range(signed)[0] <= bits:
        return
    calls = {"direct": 0, "shared": 0}
    direct, table_codes = mapping._quantize_direct, blocks.CodeTable.quantize
    monkeypatch.setattr(mapping, "_quantize_direct",  # on the data, not on a table's probes
                        lambda v, *a, **k: calls.__setitem__("direct", calls["direct"]
                                                             + (v.shape in shapes))
                        or direct(v, *a, **k))
    monkeypatch.setattr(blocks.CodeTable, "quantize",  # of the products x·μ/r
                        lambda *a, **k: calls.__setitem__("shared", calls["shared"]
                                                          + (k.get("scale") is not None))
                        or table_codes(*a, **k))
    rng = np.random.default_rng(bits * 2 + signed)
    shapes = [(3, 5, 67), (2, 64, 3), (1, 16, 7, 7), (700,)]
    for shape in shapes:
        x = data(rng, shape)
        x.reshape(-1)[:4] = [np.inf, -np.inf, -F32.max, F32.max]  # saturate like the reference
        for axis in axes(shape):
            _, params = mapping.fit(np.nan_to_num(x), bits, axis, signed, {})
            want = ref_compander_quantize(mapping, x, bits, axis, signed, params)
            got = mapping.quantize(x, bits, axis, signed, params)
            np.testing.assert_array_equal(got, want, err_msg=f"{shape} axis={axis}")
    shared_keys = [k for k, v in compander._TABLES.items()
                   if v is not None and dict((n, b) for n, _, b in k[3]).get("max_abs")
                   == np.float32(255).tobytes()]  # r = μ: the table of x·μ/r
    assert len(shared_keys) == 1 and calls["shared"] > 0  # ...built once it pays
    assert calls["direct"] <= 2  # the calls before: 700 elements would not pay for it


def test_shared_table_is_built_once_the_work_asked_of_it_pays(fresh_tables) -> None:
    mapping = get("mulaw")
    x = data(np.random.default_rng(4), (700,))
    _, params = mapping.fit(x, 4, None, True, {})
    want = ref_compander_quantize(mapping, x, 4, None, True, params)
    np.testing.assert_array_equal(mapping.quantize(x, 4, None, True, params), want)
    assert not compander._TABLES and list(compander._PENDING.values()) == [700]
    np.testing.assert_array_equal(mapping.quantize(x, 4, None, True, params), want)
    assert len(compander._TABLES) == 1 and not compander._PENDING  # 1400 elements: built


def test_mulaw_channels_without_a_float32_factor_are_coded_directly(fresh_tables) -> None:
    """μ/r past float32's normal range (a subnormal r) keeps the direct path, exactly."""
    mapping = get("mulaw")
    x = data(np.random.default_rng(5), (2, 3, 700))
    x[:, 1] *= F32.smallest_subnormal  # that channel's values, and r, are subnormal
    for signed in (False, True):
        _, params = mapping.fit(x, 6, 1, signed, {})
        assert mapping.input_scale(params) is None
        np.testing.assert_array_equal(mapping.quantize(x, 6, 1, signed, params),
                                      ref_compander_quantize(mapping, x, 6, 1, signed, params))
    assert not any(compander._TABLES.values())


@pytest.mark.parametrize("name", COMPANDERS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_compander_direct_decoding_matches_its_table(name: str, bits: int) -> None:
    """Element by element (small tensors, many channels) gives the table's floats: for
    μ-law through its per-code part evaluated once per code."""
    rng = np.random.default_rng(bits)
    x = data(rng, (2, 9, 41))
    for signed in (False, True):
        for axis in (None, 1):
            fitted = _params(name, x, bits, axis, signed)
            if fitted is None:
                continue
            mapping, is_signed, params = fitted
            codes = mapping.quantize(x, bits, axis, is_signed, params)
            want = ref_lookup(mapping.table(bits, is_signed, params), codes, bits, is_signed,
                              axis)
            got = mapping._dequantize_direct(codes, bits, axis, is_signed, params)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- bit packing with the signed offset -------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", SIZES + [0, 8, 9, 71])
def test_pack_signed_matches_reference(small_blocks, bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 100 + n)
    lo, hi = code_range(bits, True)
    codes = rng.integers(lo, hi + 1, n).astype(np.int8)
    packed = bitpack.pack(codes, bits, signed=True)
    assert packed.tobytes() == ref_pack(codes, bits, signed=True)
    back = bitpack.unpack(packed, bits, n, signed=True)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    out = np.full(n, 99, np.int8)
    assert bitpack.unpack(packed.tobytes(), bits, n, out=out, signed=True) is out
    np.testing.assert_array_equal(out, codes)
    unsigned = (codes.view(np.uint8) & ((1 << bits) - 1)).astype(np.uint8)
    assert bitpack.pack(unsigned, bits).tobytes() == ref_pack(unsigned, bits)


def test_pack_signed_layouts_and_unaligned(small_blocks) -> None:
    rng = np.random.default_rng(1)
    for bits in (3, 5, 8):
        lo, hi = code_range(bits, True)
        big = rng.integers(lo, hi + 1, (2, 301)).astype(np.int8)
        for codes in (big, big[:, 1:], big.T, big[1, 3:]):
            assert bitpack.pack(codes, bits, signed=True).tobytes() == \
                ref_pack(np.ascontiguousarray(codes), bits, signed=True)


def test_pack_copy_false_may_share_only_for_8_bits() -> None:
    codes = np.arange(64, dtype=np.uint8)
    assert np.shares_memory(bitpack.pack(codes, 8, copy=False), codes)
    assert not np.shares_memory(bitpack.pack(codes, 8), codes)
    assert not np.shares_memory(bitpack.pack(codes & 7, 3, copy=False), codes)
    with pytest.raises(TypeError, match="uint8"):
        bitpack.pack(codes.view(np.int8), 4)


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_streams_carry_the_reference_codes(small_blocks, method: str) -> None:
    rng = np.random.default_rng(3)
    mapping = get(method)
    for bits in range(1, 9):
        for signed in (False, True):
            lo, hi = mapping.bit_range(signed)
            if not lo <= bits <= hi:
                continue
            for shape in [(1, 16, 7, 7), (1000,)]:
                x = data(rng, shape)
                for axis in axes(shape):
                    q = codec.quantize(x, method, bits, axis, signed=signed)
                    params = {p.name: q.param(p.name) for p in mapping.params}
                    if mapping.linear:
                        slo, shi = code_range(bits, q.signed)
                        if method == "symmetric":
                            params["zero_point"] = np.zeros((), np.int16)
                        want = ref_uniform_quantize(x, params["scale"], params["zero_point"],
                                                    slo, shi, axis, q.codes.dtype)
                    else:
                        want = ref_compander_quantize(mapping, x, bits, axis, q.signed, params)
                    np.testing.assert_array_equal(q.codes, want)
                    blob = codec.encode(x, method, bits, axis, signed=signed)
                    assert blob[-4:] == zlib.crc32(blob[:-4]).to_bytes(4, "little")
                    back = codec.decode_qtensor(blob)
                    np.testing.assert_array_equal(back.codes, want)
                    np.testing.assert_array_equal(codec.decode(blob), codec.dequantize(q))


@pytest.mark.parametrize("method", METHODS)
def test_table_decode_equals_dequantize_at_every_size(small_blocks, monkeypatch,
                                                      method: str) -> None:
    """Per-tensor streams of 1-7 bits decode through a table of bytes or code pairs:
    the very floats of unpack + dequantize, on sizes that end in a partial byte, in
    fewer than 8 codes and across segments, into new arrays and into ``out``."""
    used = []
    real = pipeline._FieldTable.decode
    monkeypatch.setattr(pipeline._FieldTable, "decode",
                        lambda self, *a: (used.append(self.k), real(self, *a)))
    mapping = get(method)
    rng = np.random.default_rng(7)
    for bits in range(1, 8):
        for signed in (False, True):
            lo, hi = mapping.bit_range(signed)
            if not lo <= bits <= hi:
                continue
            for n in SIZES + [9, 130, 199]:
                x = data(rng, (n,))
                blob = codec.encode(x, method, bits, signed=signed)
                want = codec.dequantize(codec.decode_qtensor(blob))
                used.clear()
                np.testing.assert_array_equal(codec.decode(blob).view(np.uint32),
                                              want.view(np.uint32))
                assert used and used[0] == (8 // bits if 8 % bits == 0 else 2)
                out = np.full(n, np.nan, np.float32)
                codec.decode(blob, out=out)
                np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
                half = codec.encode(x.astype(np.float16), method, bits, signed=signed)
                np.testing.assert_array_equal(
                    codec.decode(half), codec.dequantize(codec.decode_qtensor(half))
                    .astype(np.float16))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_per_channel_table_decode_equals_dequantize(small_blocks, monkeypatch,
                                                    method: str, bits: int) -> None:
    """Per-channel streams decode through one table per channel: the very floats of
    unpack + dequantize, for runs within a block, across blocks and split over segments,
    channels repeated over a batch, into new arrays, into ``out`` and to float16."""
    monkeypatch.setattr(pipeline._FieldTable, "CHANNEL_TABLES_SHARE", 0)  # any size
    per_channel = []
    real = pipeline._FieldTable.decode
    monkeypatch.setattr(pipeline._FieldTable, "decode",
                        lambda self, src, dst, rows=None: (per_channel.append(rows is not None),
                                                           real(self, src, dst, rows)))
    mapping = get(method)
    rng = np.random.default_rng(bits)
    for signed in (False, True):
        lo, hi = mapping.bit_range(signed)
        if not lo <= bits <= hi:
            continue
        for shape, axis in [((3, 5, 16), 1), ((2, 4, 200), 1), ((6, 40), 0), ((4, 3, 8, 2), 2),
                            ((2, 3, 10), 1)]:
            x = data(rng, shape)
            blob = codec.encode(x, method, bits, axis, signed=signed)
            want = codec.dequantize(codec.decode_qtensor(blob))
            per_channel.clear()
            np.testing.assert_array_equal(codec.decode(blob).view(np.uint32),
                                          want.view(np.uint32), err_msg=f"{shape} {axis}")
            whole = int(np.prod(shape[axis + 1:])) % (8 // bits) == 0
            assert (bool(per_channel) and all(per_channel)) == whole, (shape, axis)
            out = np.full(shape, np.nan, np.float32)
            codec.decode(blob, out=out)
            np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
            half = codec.encode(x.astype(np.float16), method, bits, axis, signed=signed)
            np.testing.assert_array_equal(
                codec.decode(half),
                codec.dequantize(codec.decode_qtensor(half)).astype(np.float16))


def test_pair_tables_only_for_tensors_that_pay_for_them() -> None:
    """A pair table has 2**(2*bits) entries: small tensors unpack instead, and linear
    codes (cheap to dequantize) need a larger tensor than compander codes."""
    usable = pipeline._FieldTable.usable
    lin, mu = get("linear"), get("mulaw")
    assert usable(lin, 4, 1) and usable(lin, 1, 3) and usable(mu, 2, 5)
    assert not usable(lin, 8, 1 << 24) and not usable(mu, 8, 1 << 24)
    assert not usable(lin, 4, 0)
    assert not usable(mu, 7, (16 << 14) - 1) and usable(mu, 7, 16 << 14)
    assert usable(mu, 3, 1 << 10) and not usable(mu, 3, 1000)
    assert not usable(lin, 3, (1 << 20) - 1) and usable(lin, 7, 1 << 20)
    # Per channel: byte fields whole in every run, tables at most a quarter of the output.
    assert usable(mu, 4, 256 * 2048, (256, 2048)) and not usable(mu, 4, 256 * 2047, (256, 2047))
    assert not usable(mu, 4, 256 * 2046, (256, 2046))  # 4 KiB of tables per 8 KiB of floats
    assert usable(lin, 2, 8 * 4096, (8, 4096)) and not usable(lin, 2, 8 * 4094, (8, 4094))
    assert not usable(mu, 5, 1 << 24, (2, 1 << 23)) and not usable(mu, 8, 1 << 24, (2, 1 << 23))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_code_table_with_several_steps_in_a_bucket(steps: int) -> None:
    """Up to three steps inside one bucket (high 16 bits): the gather-and-compare path."""
    edges = np.float32([1.0005, 1.001, 1.002][:steps] + [-2.0, 7.5])
    edges.sort()

    def f(v: np.ndarray) -> np.ndarray:
        return (v[:, None] >= edges).sum(axis=1).astype(np.uint8)

    table = blocks.CodeTable.build(f, np.dtype(np.uint8))
    assert table is not None
    assert (table.entry is None) == (steps > 1)
    probe = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)),
                            np.nextafter(edges, np.float32(np.inf)),
                            np.linspace(-3, 9, 5001, dtype=np.float32),
                            np.float32([0.0, -0.0, np.inf, -np.inf])])
    np.testing.assert_array_equal(table.quantize(probe, np.dtype(np.uint8)), f(probe))
    keep = probe >= 0
    np.testing.assert_array_equal(
        table.quantize(probe[keep], np.dtype(np.uint8), nonneg=True), f(probe[keep]))


@pytest.mark.parametrize("edge", [0.0, 1e-45, 2.5])
def test_code_table_for_tensors_without_negatives(edge: float) -> None:
    """The path for tensors with nothing below zero, on a step just at or above zero:
    -0.0 sits at the top of its bucket, where a step at 0 lies (-0.0 >= 0)."""
    edge32 = np.float32(edge)

    def f(v: np.ndarray) -> np.ndarray:
        return (v >= edge32).astype(np.uint8)

    table = blocks.CodeTable.build(f, np.dtype(np.uint8))
    assert table is not None and table.entry is not None
    above = np.nextafter(edge32, np.float32(np.inf))
    probe = np.float32([-0.0, 0.0, 1e-45, 2e-45, 1e-38, 1.0, 2.5, above, 3.0, np.inf])
    np.testing.assert_array_equal(
        table.quantize(probe, np.dtype(np.uint8), nonneg=True), f(probe))
    np.testing.assert_array_equal(table.quantize(probe, np.dtype(np.uint8)), f(probe))


def test_code_table_refuses_what_it_cannot_hold() -> None:
    four = np.float32([1.0005, 1.001, 1.002, 1.003])  # four steps inside one bucket
    assert blocks.CodeTable.build(
        lambda v: (v[:, None] >= four).sum(axis=1).astype(np.uint8), np.dtype(np.uint8)) is None
    # a jump of two codes at one value
    assert blocks.CodeTable.build(
        lambda v: np.where(v >= 1, 2, 0).astype(np.uint8), np.dtype(np.uint8)) is None
    # codes beyond the output type
    assert blocks.CodeTable.build(
        lambda v: (v >= 1).astype(np.int64) * 300, np.dtype(np.uint8)) is None


@pytest.mark.parametrize("method", ["mulaw", "log", "exp"])
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_many_channel_direct_decoding_equals_table_lookup(method: str, bits: int) -> None:
    """Streams whose per-channel tables would dwarf their output decode element by
    element; that path must give the very same floats as the tables."""
    from codec import mappings
    from codec.mappings.compander import lookup

    rng = np.random.default_rng(bits)
    x = rng.laplace(size=(300, 3)).astype(np.float32)
    q = codec.quantize(x, method, bits, axis=0)
    m = mappings.get(method)
    params = {p.name: q.param(p.name) for p in m.params}
    direct = m.dequantize(q.codes, bits, 0, q.signed, params)
    table = lookup(m.table(bits, q.signed, params), q.codes, bits, q.signed, 0)
    assert np.array_equal(direct, table)


# --- raw streams, segment by segment ------------------------------------------------------


@pytest.mark.parametrize("size", [8, 64, 1000])
def test_segments_tile_the_tensor_on_byte_boundaries(size: int) -> None:
    for shape in [(1000,), (3, 5, 67), (2, 64, 3), (4, 33), (1, 16, 7, 7), (2, 3, 2000)]:
        n = int(np.prod(shape))
        for axis in axes(shape):
            segs = list(pipeline.segments(shape, axis, axis is not None, size))
            assert segs[0].start == 0 and segs[-1].stop == n
            post = int(np.prod(shape[axis + 1:])) if axis is not None else n
            for a, b in zip(segs, segs[1:]):
                assert a.stop == b.start and a.stop % 8 == 0
            for seg in segs:
                assert int(np.prod(seg.shape)) == seg.stop - seg.start
                if seg.rows is not None:  # each row is one channel's contiguous run
                    first_row = seg.start // post
                    assert seg.rows[0] == first_row % shape[axis]
                    assert len(seg.rows) == seg.shape[0]


def test_pack_into_out_with_a_workspace_matches_pack() -> None:
    rng = np.random.default_rng(5)
    ws = bitpack.workspace(300)
    for bits in range(1, 9):
        for signed in (False, True):
            lo, hi = code_range(bits, signed)
            codes = rng.integers(lo, hi + 1, 300).astype(np.int8 if signed else np.uint8)
            out = np.full(bitpack.packed_size(300, bits), 0xAA, np.uint8)
            bitpack.pack(codes, bits, signed=signed, out=out, workspace=ws)
            assert out.tobytes() == ref_pack(codes, bits, signed)
            back = np.empty(300, codes.dtype)
            bitpack.unpack(out, bits, 300, out=back, signed=signed, workspace=ws)
            np.testing.assert_array_equal(back, codes)
    with pytest.raises(ValueError):
        bitpack.pack(np.zeros(16, np.uint8), 3, out=np.empty(5, np.uint8))
    with pytest.raises(TypeError):
        bitpack.pack(np.zeros(16, np.uint8), 3, out=np.empty(6, np.int8))


def test_out_bytes_in_place_and_fallback_agree() -> None:
    for n in (0, 1, 2, 1000):
        built = []
        for in_place in (True, False):
            ob = OutBytes(n, in_place=in_place)
            ob.array[:] = np.arange(n) % 251
            built.append(ob.finish())
        assert built[0] == built[1] == (np.arange(n) % 251).astype(np.uint8).tobytes()
        assert all(type(b) is bytes for b in built)
    assert OutBytes(4).finish() is not OutBytes(4).finish()  # fresh objects, never shared


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_raw_decode_checks_every_segment_and_the_header(small_blocks, bits: int) -> None:
    x = data(np.random.default_rng(bits), (1, 16, 7, 7))
    for signed in (False, True):
        blob = codec.encode(x, "linear", bits, 1, signed=signed)
        assert codec.decode(blob).dtype == np.float32
        for pos in (6, 20, len(blob) // 2, len(blob) - 6):  # flags, params, payload
            bad = bytearray(blob)
            bad[pos] ^= 0x10
            with pytest.raises(codec.FormatError):
                codec.decode(bytes(bad))
    for dtype in (np.float16, np.float64):  # other output dtypes go through a scratch
        y = x.astype(dtype)
        blob = codec.encode(y, "mulaw", max(bits, 2), 1)
        got = codec.decode(blob)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, codec.dequantize(codec.decode_qtensor(blob))
                                      .astype(dtype))


@pytest.mark.parametrize("method,bits,axis,entropy", [
    ("linear", 8, None, None), ("symmetric", 3, 1, None), ("mulaw", 4, None, None),
    ("exp", 5, 1, None), ("linear", 4, None, "zstd"), ("log", 3, 1, "ans")])
def test_decode_into_out_equals_decode(method: str, bits: int, axis: int | None,
                                       entropy: str | None) -> None:
    x = data(np.random.default_rng(bits), (2, 6, 9, 11))
    for dtype in (np.float32, np.float16, np.float64):
        blob = codec.encode(x.astype(dtype), method, bits, axis, entropy=entropy)
        want = codec.decode(blob)
        out = np.full(x.shape, np.nan, dtype)
        assert codec.decode(blob, out=out) is out
        np.testing.assert_array_equal(out, want)
    blob = codec.encode(x, method, bits, axis, entropy=entropy)
    for bad, err in ((np.empty(x.shape, np.float64), ValueError),
                     (np.empty(x.shape[::-1], np.float32), ValueError),
                     (np.empty(x.shape, np.float32, order="F"), ValueError),
                     (x.tolist(), TypeError)):
        with pytest.raises(err):
            codec.decode(blob, out=bad)
    ro = np.empty(x.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        codec.decode(blob, out=ro)


def test_decode_out_must_not_overlap_the_stream() -> None:
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    blob = codec.encode(x, "linear", 8)
    buf = bytearray(blob) + bytearray(x.nbytes)
    alias = np.frombuffer(buf, np.float32, 64, len(blob) - len(blob) % 4).reshape(8, 8)
    with pytest.raises(ValueError, match="overlaps"):
        codec.decode(memoryview(buf)[: len(blob)], out=alias)


def test_row_percentiles_are_numpys_nanpercentile_bit_for_bit() -> None:
    """log's β fit takes its quantiles from a vectorized nanpercentile: same bits."""
    import warnings

    from codec.mappings.log import _QUANTILES, _nan_percentiles
    rng = np.random.default_rng(11)
    for trial in range(400):
        c, s = int(rng.integers(1, 12)), int(rng.integers(1, 200))
        rows = np.abs(rng.laplace(size=(c, s))) * 10.0 ** rng.uniform(-30, 30)
        rows[rng.random((c, s)) < rng.uniform(0, 1)] = np.nan
        if trial % 5 == 0:
            rows[0] = np.nan  # a dead channel
        if trial % 7 == 0:
            rows[-1] = 1.5  # a constant one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanpercentile(rows, _QUANTILES, axis=1)
        got = _nan_percentiles(rows, _QUANTILES)
        np.testing.assert_array_equal(got.view(np.uint64)[~np.isnan(got)],
                                      want.view(np.uint64)[~np.isnan(want)])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
