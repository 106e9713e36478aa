"""Linear quantization with given scale/zero point is bit-exact ONNX QuantizeLinear
and DequantizeLinear, with onnxruntime as the oracle (opset 13, per-tensor and
per-axis, uint8 and int8 zero points).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

import codec

OPSET = 13
F32_MAX = float(np.finfo(np.float32).max)
ZP_TYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


@functools.cache
def _session(op: str, zp_dtype: np.dtype, ndim: int, axis: int | None) -> ort.InferenceSession:
    """One QuantizeLinear/DequantizeLinear node with every operand a graph input."""
    zp_type = ZP_TYPES[np.dtype(zp_dtype)]
    x_type = TensorProto.FLOAT if op == "QuantizeLinear" else zp_type
    y_type = zp_type if op == "QuantizeLinear" else TensorProto.FLOAT
    pdims = [] if axis is None else [None]
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "scale", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", x_type, [None] * ndim),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, pdims),
         helper.make_tensor_value_info("zp", zp_type, pdims)],
        [helper.make_tensor_value_info("y", y_type, [None] * ndim)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def ort_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None
                 ) -> np.ndarray:
    sess = _session("QuantizeLinear", zp.dtype, x.ndim, axis)
    return sess.run(None, {"x": x, "scale": scale, "zp": zp})[0]


def ort_dequantize(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None
                   ) -> np.ndarray:
    sess = _session("DequantizeLinear", zp.dtype, codes.ndim, axis)
    return sess.run(None, {"x": codes, "scale": scale, "zp": zp})[0]


def codec_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None
                   ) -> codec.QTensor:
    return codec.quantize(x, "linear", 8, axis, scale=scale, zero_point=zp,
                          signed=(zp.dtype == np.int8))


def assert_same_codes(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None
                      ) -> None:
    expected = ort_quantize(x, scale, zp, axis)
    q = codec_quantize(x, scale, zp, axis)
    assert q.codes.dtype == expected.dtype
    if not np.array_equal(q.codes, expected):
        bad = np.argwhere(q.codes != expected)[0]
        raise AssertionError(
            f"{np.count_nonzero(q.codes != expected)} codes differ; first at {tuple(bad)}: "
            f"x={x[tuple(bad)]!r} codec={q.codes[tuple(bad)]} ort={expected[tuple(bad)]}")
    # The same codes survive the bitstream, and decode like DequantizeLinear.
    blob = codec.encode(x, "linear", 8, axis, scale=scale, zero_point=zp,
                        signed=bool(zp.dtype == np.int8))
    assert np.array_equal(codec.decode_qtensor(blob).codes, expected)
    assert np.array_equal(codec.decode(blob), ort_dequantize(expected, scale, zp, axis))


# ----------------------------------------------------------------------------- strategies


scales = st.floats(float(np.float32(1e-4)), 1e4, width=32)


@st.composite
def zero_points(draw, dtype, n: int | None) -> np.ndarray:
    info = np.iinfo(dtype)
    ints = st.integers(int(info.min), int(info.max))
    if n is None:
        return np.array(draw(ints), dtype)
    return np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype)


@st.composite
def linear_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=6))
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    n = None if axis is None else shape[axis]
    if n is None:
        scale = np.array(draw(scales), np.float32)
    else:
        scale = np.array(draw(st.lists(scales, min_size=n, max_size=n)), np.float32)
    zp_dtype = draw(st.sampled_from([np.uint8, np.int8]))
    zp = draw(zero_points(zp_dtype, n))
    # Mostly values around the grid (including exact ties), some anywhere in float32.
    grid = st.builds(lambda k, f: np.float32((k + f) * float(np.max(scale))),
                     st.integers(-400, 400), st.sampled_from([0.0, 0.5, -0.5, 0.25, 0.4999999]))
    elements = grid | st.floats(width=32, allow_nan=False) | st.sampled_from(
        [np.inf, -np.inf, F32_MAX, -F32_MAX, 0.0, -0.0])
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    return x, scale, zp, axis


# ----------------------------------------------------------------------------- QuantizeLinear


@settings(max_examples=400, deadline=None)
@given(case=linear_cases())
def test_quantize_matches_onnxruntime(case) -> None:
    x, scale, zp, axis = case
    assert_same_codes(x, scale, zp, axis)


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("log2_scale", [-20, -3, 0, 1, 7, 30])
def test_exact_half_ties_round_to_even_before_the_zero_point(zp_dtype, log2_scale) -> None:
    # x = (k + 1/2)·2^e is exact in float32 and x/scale is exactly k + 1/2:
    # ONNX rounds it half-to-even *then* adds the zero point. Adding an odd
    # zero point first would round the other way on every tie.
    scale = np.array(2.0 ** log2_scale, np.float32)
    k = np.arange(-300, 300)
    x = ((k + 0.5) * 2.0 ** log2_scale).astype(np.float32)
    assert np.array_equal(x.astype(np.float64) / float(scale), k + 0.5)  # really ties
    info = np.iinfo(zp_dtype)
    for z in (0, 1, 3, -3, 127, -128, 255, int(info.min), int(info.max)):
        if not info.min <= z <= info.max:
            continue
        zp = np.array(z, zp_dtype)
        assert_same_codes(x, scale, zp, None)
        # And the expected rule, spelled out: rint (half to even), then + z, then clamp.
        want = np.clip(np.rint(k + 0.5) + z, info.min, info.max).astype(zp_dtype)
        assert np.array_equal(codec_quantize(x, scale, zp, None).codes, want)


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
def test_ties_per_axis(zp_dtype) -> None:
    rng = np.random.default_rng(3)
    log2 = np.array([-6, -1, 0, 2, 5])
    scale = (2.0 ** log2).astype(np.float32)
    k = rng.integers(-200, 200, size=(7, 5, 9))
    x = ((k + 0.5) * scale[None, :, None]).astype(np.float32)
    info = np.iinfo(zp_dtype)
    zp = rng.integers(int(info.min), int(info.max) + 1, size=5).astype(zp_dtype)
    for axis in (1, -2):
        assert_same_codes(x, scale, zp, axis)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_saturation_of_inf_and_far_out_of_range_values(zp_dtype, axis) -> None:
    specials = [np.inf, -np.inf, F32_MAX, -F32_MAX, 1e30, -1e30, 3e38, -3e38, 1e4, -1e4,
                200.0, -200.0, 128.5, -128.5, 127.5, -127.5, 0.0, -0.0, 1e-45, -1e-45]
    x = np.array(specials * 3, np.float32).reshape(3, -1)
    info = np.iinfo(zp_dtype)
    for s, z in [(1.0, 0), (1.0, int(info.max)), (1.0, int(info.min)), (0.5, 10),
                 (1e-30, 0), (3e38, 1), (np.float32(1e-45), 0)]:
        n = None if axis is None else x.shape[axis]
        scale = np.full(() if n is None else n, s, np.float32)
        zp = np.full(() if n is None else n, z, zp_dtype)
        assert_same_codes(x, scale, zp, axis)
    q = codec_quantize(x, np.array(1.0, np.float32), np.array(0, zp_dtype), None)
    assert np.all(q.codes[x == np.inf] == info.max) and np.all(q.codes[x == -np.inf] == info.min)
    # (Δ = 3e38 decodes codes far from the zero point to ±inf, exactly as
    # DequantizeLinear does: that overflow warning is expected here.)


@settings(max_examples=100, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e6, 1e6, width=32)),
       scale=st.floats(1e-6, 1e6), zp=st.integers(0, 255), signed=st.booleans())
def test_float64_scale_gives_the_same_codes_as_its_float32_cast(x, scale, zp, signed) -> None:
    # The library stores and uses the scale as float32 (like ONNX); a float64
    # scale (not representable in float32) must not change any code.
    zp_dtype = np.int8 if signed else np.uint8
    zp = np.array(zp - 128 if signed else zp, zp_dtype)
    s64 = np.array(scale, np.float64)
    s32 = s64.astype(np.float32)
    a = codec.quantize(x, "linear", 8, scale=s64, zero_point=zp, signed=signed)
    b = codec.quantize(x, "linear", 8, scale=s32, zero_point=zp, signed=signed)
    assert np.array_equal(a.codes, b.codes)
    assert a.scale.dtype == np.float32 and a.scale == s32
    assert np.array_equal(a.codes, ort_quantize(x, s32, zp, None))
    # A Python float and a per-channel float64 list behave the same way.
    c = codec.quantize(x, "linear", 8, scale=scale, zero_point=int(zp), signed=signed)
    assert np.array_equal(a.codes, c.codes)
    x2 = np.stack([x, -x])
    d = codec.quantize(x2, "linear", 8, 0, scale=[scale, scale / 3], zero_point=[int(zp)] * 2,
                       signed=signed)
    assert d.scale.dtype == np.float32
    assert np.array_equal(d.codes, ort_quantize(x2, d.scale, np.array([zp, zp]), 0))


# ----------------------------------------------------------------------------- DequantizeLinear


@settings(max_examples=200, deadline=None)
@given(data=st.data(), zp_dtype=st.sampled_from([np.uint8, np.int8]),
       shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6))
def test_dequantize_matches_onnxruntime(data, zp_dtype, shape) -> None:
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    n = None if axis is None else shape[axis]
    wide = st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32)
    if n is None:
        scale = np.array(data.draw(scales | wide), np.float32)
    else:
        scale = np.array(data.draw(st.lists(scales | wide, min_size=n, max_size=n)), np.float32)
    zp = data.draw(zero_points(zp_dtype, n))
    codes = data.draw(hnp.arrays(zp_dtype, shape))
    q = codec_quantize(np.zeros(shape, np.float32), scale, zp, axis)
    q = dataclasses.replace(q, codes=codes)
    expected = ort_dequantize(codes, scale, zp, axis)
    got = codec.dequantize(q)
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    # And through a stream (encode_qtensor/decode).
    assert np.array_equal(codec.decode(codec.encode_qtensor(q)), expected)


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
def test_dequantize_every_code_every_zero_point(zp_dtype) -> None:
    info = np.iinfo(zp_dtype)
    codes = np.arange(int(info.min), int(info.max) + 1).astype(zp_dtype)
    codes = np.broadcast_to(codes, (256, 256)).copy()  # row r uses zero point r
    zp = np.arange(int(info.min), int(info.max) + 1).astype(zp_dtype)
    scale = np.linspace(1e-3, 10, 256).astype(np.float32)
    q = codec_quantize(np.zeros((256, 256), np.float32), scale, zp, 0)
    q = dataclasses.replace(q, codes=codes)
    assert np.array_equal(codec.dequantize(q), ort_dequantize(codes, scale, zp, 0))


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_large_tensor_matches(zp_dtype, axis) -> None:
    # More elements than the codec's internal 64 Ki blocks, channels crossing blocks.
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 130, 700)) * 20).astype(np.float32)
    n = None if axis is None else x.shape[axis]
    scale = rng.uniform(0.01, 1.0, () if n is None else n).astype(np.float32)
    info = np.iinfo(zp_dtype)
    zp = rng.integers(int(info.min) // 2, int(info.max) // 2 + 1, () if n is None else n
                      ).astype(zp_dtype)
    assert_same_codes(x, scale, zp, axis)
