"""Round trips through every method: shape/dtype, error bounds, monotone levels,
deterministic bytes, edge cases and argument errors.

Library RuntimeWarnings (overflow, invalid, all-NaN slices...) count as failures
here: valid input must not make the codec compute with inf/NaN behind our back.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import codec

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

METHODS = ("linear", "symmetric", "mulaw", "log", "exp")
COMPANDERS = ("mulaw", "log", "exp")
DTYPES = (np.float16, np.float32, np.float64)
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)

# The documented bit ranges: (unsigned codes, signed codes).
BITS = {
    "linear": ((1, 8), (1, 8)),
    "symmetric": ((1, 8), (2, 8)),
    "mulaw": ((1, 8), (2, 8)),
    "log": ((1, 8), (2, 8)),
    "exp": ((1, 8), (2, 8)),
}

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=150, deadline=None)


# ----------------------------------------------------------------------------- helpers


def f32(v: float) -> float:
    """The float32 nearest to ``v``, as a Python float (hypothesis bounds for width=32)."""
    return float(np.float32(v))


def make_data(seed: int, shape: tuple[int, ...], dtype: type, nonneg: bool,
              scale_exp: float = 0.0) -> np.ndarray:
    """Gaussian/Laplacian-ish data at 10**scale_exp; post-ReLU (with exact zeros) if nonneg."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if seed % 2 else rng.laplace(size=shape)
    x = x * 10.0 ** scale_exp
    if nonneg:
        x = np.maximum(x, 0.0)
    return x.astype(dtype)


def bcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A 0-d or per-channel parameter shaped to broadcast against the tensor."""
    p = np.asarray(param)
    if axis is None or p.ndim == 0:
        return p.reshape(())
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def ulp_slack(*arrays: np.ndarray) -> np.ndarray:
    """A few float32 ulps of the largest magnitude involved, element-wise."""
    m = np.maximum.reduce([np.abs(np.asarray(a, np.float32)) for a in arrays])
    # spacing() of the float just below, so that FLT_MAX does not overflow to inf
    return 4.0 * np.spacing(np.nextafter(m, np.float32(0))).astype(np.float64)


def linear_bound_holds(x32: np.ndarray, q: codec.QTensor, inside: np.ndarray | None = None
                       ) -> None:
    """|x - x̂| <= Δ/2 (+ float32 rounding slack) element-wise, where ``inside``."""
    xhat = codec.dequantize(q)
    assert xhat.dtype == np.float32 and xhat.shape == x32.shape
    assert np.all(np.isfinite(xhat))
    step = bcast(q.scale, x32.ndim, q.axis).astype(np.float64)
    err = np.abs(x32.astype(np.float64) - xhat.astype(np.float64))
    bound = step / 2 + ulp_slack(x32, xhat)
    ok = err <= bound
    if inside is not None:
        ok |= ~inside
    bad = np.argwhere(~ok)
    assert bad.size == 0, (
        f"{bad.shape[0]} elements beyond Δ/2, first at {tuple(bad[0])}: "
        f"x={x32[tuple(bad[0])]!r} x̂={xhat[tuple(bad[0])]!r} "
        f"Δ={np.broadcast_to(step, x32.shape)[tuple(bad[0])]!r} "
        f"zero_point={q.zero_point!r}")


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    noise = np.sum((x - y.astype(np.float64)) ** 2)
    return float(10 * np.log10(np.sum(x ** 2) / max(noise, 1e-300)))


@st.composite
def method_bits_signed(draw, methods=METHODS, signed=None):
    """(method, bits, code signedness) with bits inside the documented range."""
    method = draw(st.sampled_from(methods))
    s = draw(st.booleans()) if signed is None else signed
    lo, hi = BITS[method][s]
    return method, draw(st.integers(lo, hi)), s


@st.composite
def shape_axis(draw, min_dims=1, max_dims=4, max_side=6, min_side=1):
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                                  max_side=max_side))
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    return shape, axis


# ----------------------------------------------------------------------------- round trips


def test_methods_report_the_documented_bit_ranges() -> None:
    described = {m["name"]: m for m in codec.methods()}
    assert set(described) == set(METHODS)
    for name, (unsigned, signed) in BITS.items():
        assert described[name]["bits"] == {"unsigned": list(unsigned), "signed": list(signed)}


@SLOW
@given(mbs=method_bits_signed(), sa=shape_axis(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1), scale_exp=st.floats(-3, 3))
def test_roundtrip_shape_dtype_and_consistency(mbs, sa, dtype, seed, scale_exp) -> None:
    method, bits, signed = mbs
    shape, axis = sa
    # Signed codes: data with negatives (signed chosen by the data, or forced);
    # unsigned codes: post-ReLU data (linear is unsigned unless told otherwise).
    x = make_data(seed, shape, dtype, nonneg=not signed, scale_exp=scale_exp)
    force = signed if method == "linear" or seed % 3 == 0 else None
    if signed and force is None:
        assume(np.any(x < 0))
    blob = codec.encode(x, method, bits, axis, signed=force)
    info = codec.inspect(blob)
    assert info["method"] == method and info["bits"] == bits
    assert info["signed"] is signed
    assert info["shape"] == list(shape) and info["dtype"] == np.dtype(dtype).name
    assert info["axis"] == (None if axis is None else axis % len(shape))
    y = codec.decode(blob)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.isfinite(y))
    # decode(encode(x)) is exactly dequantize(quantize(x)) in the original dtype.
    q = codec.quantize(x, method, bits, axis, signed=force)
    assert q.signed is signed and q.bits == bits and q.shape == shape
    assert np.array_equal(y, codec.dequantize(q).astype(dtype))
    # The QTensor round-trips through the stream too.
    q2 = codec.decode_qtensor(blob)
    assert np.array_equal(q2.codes, q.codes) and q2.codes.dtype == q.codes.dtype
    if method in COMPANDERS:  # nothing decodes beyond the range r
        r = bcast(q.params["max_abs"], x.ndim, q.axis)
        assert np.all(np.abs(codec.dequantize(q)) <= r)
    if bits == 8 and x.size:  # and 8 bits are never far off (a coarse sanity bound)
        x32 = x.astype(np.float32)
        err = np.abs(codec.dequantize(q) - x32).max()
        assert err <= 0.05 * np.abs(x32).max(), (err, np.abs(x32).max())


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False,
                     min_value=-F32_MAX / 4, max_value=F32_MAX / 4)


@st.composite
def float_tensors(draw, elements=finite32, max_dims=3, max_side=5):
    shape, axis = draw(shape_axis(max_dims=max_dims, max_side=max_side))
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    return x, axis


@settings(max_examples=400, deadline=None)
@given(xa=float_tensors(), bits=st.integers(1, 8), signed=st.booleans())
def test_fitted_linear_error_is_at_most_half_a_step_everywhere(xa, bits, signed) -> None:
    # The fitted range [min(x, 0), max(x, 0)] lies on the grid by construction,
    # so *every* element is in range: no exclusions.
    x, axis = xa
    q = codec.quantize(x, "linear", bits, axis, signed=signed)
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    zp = np.asarray(q.zero_point)
    assert np.all((lo <= zp) & (zp <= hi))
    assert np.all(np.isfinite(q.scale) & (q.scale > 0))
    linear_bound_holds(x, q)


@pytest.mark.parametrize("x, bits", [
    ([-1.0, 1.0], 1),                   # z rounds to an end: the other side needs Δ >= 2·|x|
    ([-1.0, 0.9], 1),
    ([-1.0, 0.001962], 8),              # max(x) in (Δ/2, Δ/(2-1/255)]: z rounds to 255
    ([-0.001962, 1.0], 8),
    ([-3.0, 0.55], 2),
    ([-1e-3, 3.0e38], 8),
    ([0.0, F32_MAX], 8),                # Δ rounded up must not push the top level to inf
    ([-F32_MAX, F32_MAX], 5),
])
def test_linear_bound_regressions(x, bits) -> None:
    x = np.asarray(x, np.float32)
    for signed in (False, True):
        linear_bound_holds(x, codec.quantize(x, "linear", bits, signed=signed))


@settings(max_examples=300, deadline=None)
@given(xa=float_tensors(), bits=st.integers(2, 8), restricted=st.booleans())
def test_fitted_symmetric_error_is_at_most_half_a_step_everywhere(xa, bits, restricted) -> None:
    x, axis = xa
    q = codec.quantize(x, "symmetric", bits, axis, restricted=restricted)
    assert q.signed == bool(np.any(x < 0))
    assert np.all(np.asarray(q.zero_point) == 0)
    linear_bound_holds(x, q)
    if restricted and q.signed:  # never the lone most-negative code
        assert np.all(q.codes >= -(1 << bits - 1) + 1)


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 40),
                    elements=st.floats(0, 1e6, width=32)),
       bits=st.integers(1, 8))
def test_fitted_symmetric_unsigned_bound(x, bits) -> None:
    q = codec.quantize(x, "symmetric", bits)
    assert not q.signed
    linear_bound_holds(x, q)


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 40), elements=finite32),
       bits=st.integers(2, 8), scale=st.floats(f32(1e-6), 1e6, width=32), signed=st.booleans())
def test_given_scale_symmetric_bound_inside_its_range(x, bits, scale, signed) -> None:
    q = codec.quantize(x, "symmetric", bits, scale=scale, signed=signed)
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    s = np.float64(np.float32(scale))
    inside = (x >= (lo - 0.5) * s) & (x <= (hi + 0.5) * s)
    linear_bound_holds(x, q, inside)
    # Outside the range the codes saturate at the ends.
    assert np.all(q.codes[x > (hi + 0.5) * s] == hi)
    assert np.all(q.codes[x < (lo - 0.5) * s] == lo)


# ----------------------------------------------------------------------------- monotone levels


def param_strategy(method: str):
    pos = st.floats(f32(1e-30), f32(1e30), width=32)
    if method == "linear":
        return st.fixed_dictionaries({"scale": pos})
    if method == "symmetric":
        return st.fixed_dictionaries({"scale": pos})
    if method == "mulaw":
        return st.fixed_dictionaries({"mu": st.floats(f32(1e-3), 1e6, width=32), "max_abs": pos})
    if method == "log":
        return st.fixed_dictionaries({"beta": st.floats(f32(1.0001), 1e3, width=32),
                                      "max_abs": pos})
    return st.fixed_dictionaries({"lam": st.floats(f32(1e-6), 1e6, width=32),
                                  "max_abs": st.floats(f32(1e-6), 1e6, width=32)})


def all_codes(bits: int, signed: bool, channels: int) -> np.ndarray:
    n = 1 << bits
    k = np.arange(n) - (n // 2 if signed else 0)
    return np.broadcast_to(k, (channels, n)).astype(np.int8 if signed else np.uint8)


@st.composite
def level_cases(draw):
    method, bits, signed = draw(method_bits_signed())
    channels = draw(st.integers(1, 4))
    per_channel = draw(st.booleans())
    if draw(st.booleans()):  # fitted to random data
        seed = draw(st.integers(0, 2**32 - 1))
        x = make_data(seed, (channels, 9), np.float32, nonneg=False,
                      scale_exp=draw(st.floats(-3, 3)))
        params = {}
    else:  # given parameters, one set per channel when per-channel
        x = np.zeros((channels, 1), np.float32)
        ps = [draw(param_strategy(method)) for _ in range(channels if per_channel else 1)]
        params = {k: np.array([p[k] for p in ps], np.float32)
                  if per_channel and k != "mu" else ps[0][k]  # μ is one per stream
                  for k in ps[0]}
        if method == "linear":
            lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
            zps = [draw(st.integers(lo, hi)) for _ in range(channels if per_channel else 1)]
            params["zero_point"] = np.array(zps) if per_channel else zps[0]
    return method, bits, signed, x, (0 if per_channel else None), params


@settings(max_examples=300, deadline=None)
@given(case=level_cases())
def test_decoded_levels_are_monotone_in_the_code(case) -> None:
    method, bits, signed, x, axis, params = case
    q = codec.quantize(x, method, bits, axis, signed=signed, **params)
    assert q.signed is signed
    levels = codec.dequantize(dataclasses.replace(q, codes=all_codes(bits, signed, x.shape[0])))
    assert levels.shape == (x.shape[0], 1 << bits)
    assert np.all(np.isfinite(levels))
    steps = np.diff(levels.astype(np.float64), axis=1)
    assert np.all(steps >= 0), f"levels not monotone: {levels}"
    if method in ("linear", "symmetric"):
        assert np.all(steps > 0)
    if method in COMPANDERS:  # the outermost levels are ±r exactly
        r = bcast(q.params["max_abs"], 2, q.axis) * np.ones((x.shape[0], 1), np.float32)
        assert np.array_equal(levels[:, -1:], r)
        if signed:
            assert np.array_equal(levels[:, :1], -r)
        else:
            assert np.all(levels[:, 0] == 0)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_encoding_is_deterministic_across_layouts(method, dtype, axis) -> None:
    x = make_data(7, (3, 5, 4), dtype, nonneg=False)
    ref = codec.encode(x, method, 5, axis)
    assert codec.encode(x, method, 5, axis) == ref
    assert codec.encode(x.copy(), method, 5, axis) == ref
    fortran = np.asfortranarray(x)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
    assert codec.encode(fortran, method, 5, axis) == ref
    big = np.zeros((3, 10, 8), dtype)
    big[:, ::2, ::2] = x
    strided = big[:, ::2, ::2]
    assert not strided.flags.c_contiguous
    assert codec.encode(strided, method, 5, axis) == ref
    reversed_ = x[::-1].copy()[::-1]
    assert reversed_.strides[0] < 0
    assert codec.encode(reversed_, method, 5, axis) == ref
    swapped = x.astype(np.dtype(dtype).newbyteorder(">"))
    assert swapped.dtype.byteorder == ">" and np.array_equal(swapped, x)
    assert codec.encode(swapped, method, 5, axis) == ref
    y = codec.decode(codec.encode(swapped, method, 5, axis))
    assert y.dtype == np.dtype(dtype) and y.dtype.isnative


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, axis", [((0,), None), ((0,), 0), ((0, 3), 1), ((0, 3), None),
                                         ((3, 0), 0), ((2, 0, 3), -1), ((2, 0, 3), 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_tensors(method, shape, axis, dtype) -> None:
    x = np.zeros(shape, dtype)
    blob = codec.encode(x, method, 3, axis)
    y = codec.decode(blob)
    assert y.shape == shape and y.dtype == np.dtype(dtype)
    info = codec.inspect(blob)
    assert info["elements"] == 0 and info["payload_bytes"] == 0 and info["shape"] == list(shape)
    assert info["bits_per_element"] is None
    for name, p in info["params"].items():  # per-channel parameters: one per (empty) channel
        assert np.size(p) == (1 if axis is None or name == "mu" else shape[axis])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [1.5, -2.25, 0.0, 3 * 2.0**-16])
def test_zero_dim_scalars(method, dtype, value) -> None:
    x = np.array(value, dtype)
    y = codec.decode(codec.encode(x, method, 4))
    assert y.shape == () and y.dtype == np.dtype(dtype)
    assert y == x  # a scalar is a constant tensor: exact
    y = codec.decode(codec.encode(np.float32(value), method, 4))
    assert y.shape == () and y == np.float32(value)
    with pytest.raises(ValueError):
        codec.encode(x, method, 4, axis=0)


def exact_floats(dtype):
    """Values exactly representable in ``dtype`` and in float32 (the codec's working type)."""
    if dtype is np.float16:
        return st.floats(width=16, allow_nan=False, allow_infinity=False)
    return st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def constant_cases(draw):
    method = draw(st.sampled_from(METHODS))
    dtype = draw(st.sampled_from(DTYPES))
    value = draw(exact_floats(dtype) | st.sampled_from([0.0, -0.0, 1.0, -1.0]))
    force = draw(st.sampled_from([None, True]))
    signed = force if force is not None else (method != "linear" and value < 0)
    lo, hi = BITS[method][bool(signed)]
    bits = draw(st.integers(lo, hi))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    return method, dtype, value, force, bits, shape


@settings(max_examples=300, deadline=None)
@given(case=constant_cases())
def test_constant_tensors_come_back_exactly(case) -> None:
    method, dtype, value, force, bits, shape = case
    x = np.full(shape, value, dtype)
    y = codec.decode(codec.encode(x, method, bits, signed=force))
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    assert np.array_equal(y, x), f"{method} {bits}b signed={force}: {value!r} -> {y.ravel()[:3]}"


@st.composite
def constant_channel_cases(draw):
    method = draw(st.sampled_from(METHODS))
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = list(draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, max_side=4)))
    values = draw(st.lists(exact_floats(dtype) | st.sampled_from([0.0, 0.0, -3.5, 2.0]),
                           min_size=1, max_size=5))
    shape[axis] = len(values)
    signed = method != "linear" and min(values) < 0
    lo, hi = BITS[method][signed]
    bits = draw(st.integers(lo, hi))
    return method, dtype, tuple(shape), axis, values, bits


@settings(max_examples=300, deadline=None)
@given(case=constant_channel_cases())
def test_constant_channels_come_back_exactly(case) -> None:
    # Includes all-zero ("dead") channels next to negative ones, i.e. in signed
    # streams, where the μ-law/exp grids have no level at 0.
    method, dtype, shape, axis, values, bits = case
    x = np.empty(shape, dtype)
    x[...] = bcast(np.array(values, dtype), len(shape), axis % len(shape))
    y = codec.decode(codec.encode(x, method, bits, axis))
    assert y.dtype == np.dtype(dtype)
    assert np.array_equal(y, x), f"{method} bits={bits} channels {values} -> {y}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("outlier", [1e30, -1e30, F32_MAX, -F32_MAX, 6e4])
@pytest.mark.parametrize("axis", [None, 0])
def test_single_huge_outlier(method, outlier, axis) -> None:
    x = make_data(3, (4, 50), np.float32, nonneg=outlier > 0)
    x[2, 17] = outlier
    q = codec.quantize(x, method, 8, axis)
    y = codec.decode(codec.encode(x, method, 8, axis))
    assert np.array_equal(y, codec.dequantize(q))
    assert np.all(np.isfinite(y))
    if method in COMPANDERS:
        assert y[2, 17] == np.float32(outlier)  # it is ±r of its channel
    else:
        linear_bound_holds(x, q)
    # Channels without the outlier are unaffected by it per-channel.
    if axis == 0:
        ref = codec.decode(codec.encode(x[:2], method, 8, 0))
        assert np.array_equal(y[:2], ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_log_fits_data_spanning_all_of_float32(bits: int, signed: bool) -> None:
    """Values from subnormals to near FLT_MAX: the fitted β (r over a low quantile, to
    a root) can pass float32's range; it is kept finite, with no warning, not refused."""
    x = np.tile(np.float32([3e38, 1e-42, 1.0, -2.0, 5e-40, 0.0]), (2, 40))
    for axis in (None, 0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            blob = codec.encode(x, "log", bits, axis, signed=signed)
            y = codec.decode(blob)
        assert np.all(np.isfinite(codec.inspect(blob)["params"]["beta"]))
        assert np.all(np.isfinite(y))
        assert np.array_equal(y, codec.dequantize(codec.quantize(x, "log", bits, axis,
                                                                 signed=signed)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("nonneg", [False, True])
def test_subnormal_inputs(method, axis, nonneg) -> None:
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 64)) * 1e-40).astype(np.float32)
    x[0, :3] = [F32_TINY, -F32_TINY, 0.0]
    if nonneg:
        x = np.abs(x)
    assert np.all(np.abs(x) < np.finfo(np.float32).tiny)
    q = codec.quantize(x, method, 8, axis)
    y = codec.decode(codec.encode(x, method, 8, axis))
    assert np.all(np.isfinite(y)) and np.array_equal(y, codec.dequantize(q))
    if method in ("linear", "symmetric"):
        linear_bound_holds(x, q)
    else:
        # |x| <= r ~ 1e-40: the error is a modest fraction of the range, never
        # garbage (a μ/r overflow used to send everything to ±r).
        r = np.abs(x).max(axis=None if axis is None else 0 if axis else 1, keepdims=True)
        assert np.all(np.abs(y - x) <= 0.1 * r + F32_TINY)
        assert np.all(np.sign(y) * np.sign(x) >= 0)


@pytest.mark.parametrize("method", METHODS)
def test_float16_input(method) -> None:
    x = make_data(5, (2, 3, 16), np.float16, nonneg=False, scale_exp=2)
    x[0, 0, 0] = np.float16(65504.0)  # the float16 maximum must not decode to inf
    blob = codec.encode(x, method, 8, axis=-1)
    y = codec.decode(blob)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    assert codec.inspect(blob)["dtype"] == "float16"
    assert codec.inspect(blob)["original_bytes"] == x.size * 2
    q = codec.quantize(x, method, 8, axis=-1)
    assert np.array_equal(y, codec.dequantize(q).astype(np.float16))
    if method in COMPANDERS:
        assert y[0, 0, 0] == x[0, 0, 0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_input(method, dtype) -> None:
    native = make_data(9, (4, 6), np.dtype(dtype).newbyteorder("="), nonneg=False)
    x = native.astype(dtype)
    assert x.dtype.byteorder == ">"
    y = codec.decode(codec.encode(x, method, 6, 0))
    assert y.dtype == native.dtype and y.dtype.isnative
    assert np.array_equal(y, codec.decode(codec.encode(native, method, 6, 0)))


# ----------------------------------------------------------------------------- signedness


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(COMPANDERS), bits=st.integers(2, 8),
       seed=st.integers(0, 2**32 - 1), axis=st.sampled_from([None, 1]))
def test_post_relu_data_uses_unsigned_codes_and_beats_signed(method, bits, seed, axis) -> None:
    x = make_data(seed, (4, 256), np.float32, nonneg=True)
    assume(np.count_nonzero(x) > 16)
    blob = codec.encode(x, method, bits, axis)
    assert codec.inspect(blob)["signed"] is False
    forced = codec.encode(x, method, bits, axis, signed=True)
    assert codec.inspect(forced)["signed"] is True
    y_u, y_s = codec.decode(blob), codec.decode(forced)
    assert np.all(y_u >= 0)
    assert snr_db(x, y_u) > snr_db(x, y_s)


@pytest.mark.parametrize("method", COMPANDERS + ("symmetric",))
def test_forced_unsigned_codes_saturate_negatives_to_zero(method) -> None:
    # Unsigned codes have no negative levels: x < 0 must go to 0 (the nearest
    # level), not to +|x| (which doubles the error and flips the sign).
    x = np.array([-1.0, -0.5, -1e-3, 0.0, 0.5, 1.0], np.float32)
    y = codec.decode(codec.encode(x, method, 4, signed=False))
    assert np.all(y[:4] == 0)
    assert y[-1] == 1.0


# ----------------------------------------------------------------------------- Inf handling


GIVEN_PARAMS = {
    "linear": {"scale": 0.5, "zero_point": 7},
    "symmetric": {"scale": 0.25},
    "mulaw": {"max_abs": 2.0},
    "log": {"max_abs": 2.0, "beta": 1.5},
    "exp": {"max_abs": 2.0, "lam": 0.5},
}


@pytest.mark.parametrize("method", METHODS)
def test_inf_saturates_with_given_parameters(method) -> None:
    x = np.array([-np.inf, -1.0, 0.0, 1.0, np.inf], np.float32)
    q = codec.quantize(x, method, 4, **GIVEN_PARAMS[method])
    y = codec.decode(codec.encode(x, method, 4, **GIVEN_PARAMS[method]))
    assert np.all(np.isfinite(y)) and np.array_equal(y, codec.dequantize(q))
    assert y[0] == y.min() and y[-1] == y.max() and y[0] < 0 < y[-1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tiny_params", [False, True])
def test_huge_values_saturate_with_given_parameters(method, tiny_params) -> None:
    params = dict(GIVEN_PARAMS[method])
    if tiny_params:  # x/Δ, μ|x|/r, |x|/λ all overflow float32
        params = {k: (v if k in ("zero_point", "beta") else 1e-30) for k, v in params.items()}
    x = np.array([-F32_MAX, -3e38, -1.0, 0.0, 1.0, 3e38, F32_MAX], np.float32)
    q = codec.quantize(x, method, 6, **params)
    y = codec.decode(codec.encode(x, method, 6, **params))
    assert np.all(np.isfinite(y)) and np.array_equal(y, codec.dequantize(q))
    assert y[0] == y[1] == y.min() < 0 and y[-1] == y[-2] == y.max() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_with_fitted_parameters_is_an_error(method, bad) -> None:
    x = np.array([0.5, bad, -0.25], np.float32)
    with pytest.raises(ValueError):
        codec.encode(x, method, 4)
    with pytest.raises(ValueError):
        codec.quantize(x, method, 4, axis=0)


# ----------------------------------------------------------------------------- errors


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("method", ["nope", "", "mu-law", "linear "])
def test_unknown_method(method) -> None:
    with pytest.raises(ValueError):
        codec.encode(X, method)
    with pytest.raises(ValueError):
        codec.quantize(X, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [0, 9, -1, 16, 255])
def test_bits_out_of_range(method, bits) -> None:
    with pytest.raises(ValueError):
        codec.encode(X, method, bits)
    with pytest.raises(ValueError):
        codec.encode(np.abs(X), method, bits)


@pytest.mark.parametrize("method", ["symmetric", "mulaw", "log", "exp"])
def test_one_bit_signed_is_refused_where_documented(method) -> None:
    with pytest.raises(ValueError):
        codec.encode(X, method, 1)  # data with negatives: signed codes
    with pytest.raises(ValueError):
        codec.encode(np.abs(X), method, 1, signed=True)
    assert codec.inspect(codec.encode(np.abs(X), method, 1))["bits"] == 1  # unsigned is fine


def test_one_bit_linear_is_fine_either_way() -> None:
    for signed in (False, True):
        assert codec.inspect(codec.encode(X, "linear", 1, signed=signed))["signed"] is signed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [8.0, 4.5, True, False, "8", None, np.float32(8)])
def test_bits_must_be_an_integer(method, bits) -> None:
    with pytest.raises(TypeError):
        codec.encode(X, method, bits)


def test_numpy_integer_bits_are_accepted() -> None:
    assert codec.encode(X, "linear", np.int64(5)) == codec.encode(X, "linear", 5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", [0, 5, 11])
def test_nan_input(method, where) -> None:
    x = X.copy()
    x.flat[where] = np.nan
    with pytest.raises(ValueError):
        codec.encode(x, method)
    with pytest.raises(ValueError):  # even with every parameter given
        codec.encode(x, method, 4, **GIVEN_PARAMS[method])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x", [
    np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int64), np.arange(6, dtype=np.uint8),
    np.ones(6, bool), np.ones(6, np.complex64), np.ones(6, np.complex128),
    np.array([1.0, 2.0], dtype=object), np.array(["a", "b"]), [1, 2, 3], np.datetime64(1, "s"),
    np.ones(3, np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else np.ones(3, "m8[s]"),
], ids=lambda v: str(getattr(v, "dtype", type(v).__name__)))
def test_non_float_input_dtypes_are_type_errors(method, x) -> None:
    with pytest.raises(TypeError):
        codec.encode(x, method, 4)
    with pytest.raises(TypeError):
        codec.quantize(x, method, 4)


def test_ragged_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        codec.encode([[1.0], [1.0, 2.0]])


def test_float64_beyond_float32_range_is_refused() -> None:
    with pytest.raises(ValueError):
        codec.encode(np.array([1.0, 1e39]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("axis", [2, -3, 100, -100])
def test_axis_out_of_range(method, axis) -> None:
    with pytest.raises(ValueError):
        codec.encode(X, method, 4, axis)


@pytest.mark.parametrize("axis", [1.0, "0", True, [0]])
def test_axis_must_be_an_integer(axis) -> None:
    with pytest.raises(TypeError):
        codec.encode(X, "linear", 4, axis)


@pytest.mark.parametrize("method, kw", [
    ("linear", {"mu": 255}), ("linear", {"restricted": True}), ("symmetric", {"zero_point": 0}),
    ("mulaw", {"beta": 2.0}), ("log", {"lam": 1.0}), ("exp", {"mu": 3.0}),
    ("mulaw", {"scale": 1.0}), ("linear", {"sclae": 1.0}), ("exp", {"max_ab": 1.0}),
])
def test_unknown_keyword_parameter(method, kw) -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        codec.encode(X, method, 4, **kw)
    with pytest.raises(ValueError, match="unknown parameter"):
        codec.quantize(X, method, 4, **kw)


@pytest.mark.parametrize("method, kw", [
    ("linear", {"scale": 0.0}), ("linear", {"scale": -1.0}), ("linear", {"scale": np.nan}),
    ("linear", {"scale": np.inf}), ("linear", {"scale": [0.1, 0.0, 0.1]}),
    ("linear", {"scale": 0.1, "zero_point": 256}), ("linear", {"scale": 0.1, "zero_point": -1}),
    ("linear", {"scale": 0.1, "zero_point": 128, "signed": True}),
    ("linear", {"scale": 0.1, "zero_point": 1.5}), ("linear", {"zero_point": 3}),
    ("linear", {"scale": [0.1, 0.2]}),  # per-tensor stream given two scales
    ("symmetric", {"scale": 0.0}), ("symmetric", {"scale": -0.5}),
    ("symmetric", {"scale": np.nan}),
    ("mulaw", {"mu": 0.0}), ("mulaw", {"mu": -1.0}), ("mulaw", {"mu": np.nan}),
    ("mulaw", {"mu": [1.0, 2.0]}), ("mulaw", {"max_abs": 0.0}), ("mulaw", {"max_abs": -2.0}),
    ("log", {"beta": 1.0}), ("log", {"beta": 0.5}), ("log", {"beta": -3.0}),
    ("log", {"beta": np.inf}), ("log", {"max_abs": 0.0}),
    ("exp", {"lam": 0.0}), ("exp", {"lam": -1.0}), ("exp", {"max_abs": -1.0}),
    ("exp", {"lam": "abc"}),
])
def test_invalid_given_parameters(method, kw) -> None:
    with pytest.raises(ValueError):
        codec.encode(X, method, 8, **kw)


def test_per_channel_parameter_length_must_match() -> None:
    with pytest.raises(ValueError):
        codec.encode(X, "linear", 8, axis=0, scale=[0.1, 0.2])
    with pytest.raises(ValueError):
        codec.encode(X, "mulaw", 8, axis=1, max_abs=[1.0, 2.0, 3.0])
    # The right length works, and a scalar broadcasts over the channels.
    assert codec.inspect(codec.encode(X, "linear", 8, axis=0, scale=[0.1, 0.2, 0.3]))[
        "params"]["scale"] == pytest.approx([0.1, 0.2, 0.3])
    assert codec.inspect(codec.encode(X, "mulaw", 8, axis=1, max_abs=2.0))[
        "params"]["max_abs"] == [2.0] * 4


@pytest.mark.parametrize("signed", ["yes", 1, 0, 1.0])
def test_signed_must_be_a_bool(signed) -> None:
    with pytest.raises(TypeError):
        codec.encode(X, "mulaw", 4, signed=signed)


# ----------------------------------------------------------------------------- large tensors


def _channel_params(q: codec.QTensor, c: int) -> dict:
    def pick(v):
        v = np.asarray(v)
        return v.reshape(-1)[c] if v.ndim else v
    out = {k: pick(v) for k, v in q.params.items()}
    if q.scale is not None:
        out["scale"] = pick(q.scale)
        if q.method == "linear":
            out["zero_point"] = int(pick(q.zero_point))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, axis", [((2, 3, 150, 160), 0), ((2, 3, 150, 160), 1),
                                         ((2, 3, 150, 160), -2), ((2, 3, 150, 160), 3),
                                         ((3, 70_000), 0), ((70_000, 2), -1)])
def test_large_per_channel_tensors_match_channel_by_channel(method, shape, axis) -> None:
    # Bigger than the codec's internal blocks (64 Ki elements): the block/channel
    # bookkeeping must give every element its own channel's parameters.
    x = make_data(13, shape, np.float32, nonneg=False)
    x *= np.linspace(0.5, 4.0, shape[axis], dtype=np.float32).reshape(
        [-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
    q = codec.quantize(x, method, 5, axis)
    y = codec.decode(codec.encode(x, method, 5, axis))
    assert np.array_equal(y, codec.dequantize(q))
    for c in range(shape[axis]):
        xc = np.take(x, c, axis=axis)
        qc = codec.quantize(xc, method, 5, signed=q.signed, **_channel_params(q, c))
        assert np.array_equal(np.take(q.codes, c, axis=axis), qc.codes), f"channel {c}"
        assert np.array_equal(np.take(y, c, axis=axis), codec.dequantize(qc)), f"channel {c}"
