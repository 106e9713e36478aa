"""qconv2d: bit-exact against onnxruntime and an int64 loop reference; the ORT backend; errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.errors import MissingExtraError
from codec.qconv import _accumulate, accumulate, check_operands, conv_geometry, qconv2d
from codec.qconv_ort import _cache, clear_cache, qconv2d_ort
from codec.qtensor import QTensor

try:
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError:  # the numpy-path tests still run
    ort = None
needs_ort = pytest.mark.skipif(ort is None, reason="needs the 'ort' extra (onnxruntime, onnx)")

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
U8, S8 = np.dtype(np.uint8), np.dtype(np.int8)


# ----------------------------------------------------------------- references

def ref_acc(x: np.ndarray, w: np.ndarray, z_x: int, z_w: np.ndarray, stride: tuple[int, int],
            pads: tuple[int, int, int, int], dil: tuple[int, int], groups: int) -> np.ndarray:
    """sum (x - z_x)(w - z_w) in int64 with loops over channels and taps; padding = z_x."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    top, left, bottom, right = pads
    xp = np.full((n, c, h + top + bottom, wd + left + right), z_x, np.int64)
    xp[:, :, top:top + h, left:left + wd] = x
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    acc = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for oc in range(o):
        gi = oc // og
        for ci in range(cg):
            for i in range(kh):
                for j in range(kw):
                    i0, j0 = i * dil[0], j * dil[1]
                    tap = xp[:, gi * cg + ci, i0:i0 + stride[0] * (oh - 1) + 1:stride[0],
                             j0:j0 + stride[1] * (ow - 1) + 1:stride[1]]
                    acc[:, oc] += (tap - z_x) * (int(w[oc, ci, i, j]) - int(z_w[oc]))
    return acc


def ref_requant(acc: np.ndarray, bias: np.ndarray | None, s_x: Any, s_w: np.ndarray,
                s_y: Any, z_y: int, signed: bool, relu: bool) -> np.ndarray:
    """onnxruntime's QLinearConv output stage, written independently of codec.qconv."""
    b = 0 if bias is None else bias.astype(np.int64)[None, :, None, None]
    m = (np.float32(s_x) * s_w.astype(np.float32)) / np.float32(s_y)
    assert m.dtype == np.float32
    v = (acc + b).astype(np.float32) * m[None, :, None, None]
    q = np.rint(v).astype(np.int64) + z_y
    if relu:
        q = np.maximum(q, z_y)
    dt = np.int8 if signed else np.uint8
    return np.clip(q, np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)


def ref_float(acc: np.ndarray, bias: np.ndarray | None, s_x: Any, s_w: np.ndarray,
              relu: bool) -> np.ndarray:
    b = 0 if bias is None else bias.astype(np.int64)[None, :, None, None]
    unit = np.float32(s_x) * s_w.astype(np.float32)
    y = (acc + b).astype(np.float32) * unit[None, :, None, None]
    return np.maximum(y, 0) if relu else y


def _tt(dt: np.dtype) -> int:
    return {U8: TensorProto.UINT8, S8: TensorProto.INT8, np.dtype(np.float32): TensorProto.FLOAT,
            np.dtype(np.int32): TensorProto.INT32}[np.dtype(dt)]


def _tensor(name: str, a: np.ndarray) -> Any:
    a = np.asarray(a)
    return helper.make_tensor(name, _tt(a.dtype), a.shape, a.tobytes(), raw=True)


def _run(op: str, inputs: list[str], consts: list[Any], x: np.ndarray, out_type: int,
         attrs: dict[str, Any]) -> np.ndarray:
    node = helper.make_node(op, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", _tt(x.dtype),
                                                                          x.shape)],
                              [helper.make_tensor_value_info("y", out_type, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# ---------------------------------------------------------------- test cases

@dataclass(frozen=True)
class Case:
    x: QTensor
    w: QTensor
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dil: tuple[int, int]
    groups: int
    bias: np.ndarray | None
    out_scale: np.float32 | None
    out_zp: int | None
    relu: bool

    def kwargs(self) -> dict[str, Any]:
        return dict(bias=self.bias, stride=self.stride, padding=self.pads, dilation=self.dil,
                    groups=self.groups, out_scale=self.out_scale, out_zero_point=self.out_zp,
                    relu=self.relu)

    def attrs(self) -> dict[str, Any]:
        kh, kw = self.w.codes.shape[2:]
        return dict(strides=list(self.stride), pads=list(self.pads), dilations=list(self.dil),
                    group=self.groups, kernel_shape=[kh, kw])

    def zw(self) -> np.ndarray:
        return check_operands(self.x, self.w)[3]

    def ref_acc(self) -> np.ndarray:
        return ref_acc(self.x.codes, self.w.codes, int(self.x.zero_point), self.zw(), self.stride,
                       self.pads, self.dil, self.groups)


def qt(codes: np.ndarray, scale: Any, zp: Any, axis: int | None = None,
       method: str = "linear") -> QTensor:
    return QTensor(codes=codes, method=method, bits=8, axis=axis,
                   scale=np.asarray(scale, np.float32), zero_point=np.asarray(zp, np.int16))


def _codes(rng: np.random.Generator, dt: np.dtype, shape: tuple[int, ...], lo: int, hi: int,
           extreme: bool) -> np.ndarray:
    if extreme:
        return rng.choice(np.array([lo, lo + 1, hi - 1, hi]), shape).astype(dt)
    return rng.integers(lo, hi + 1, shape).astype(dt)


@st.composite
def cases(draw: st.DrawFn, kind: str = "any") -> Case:
    """kind: "qlinear"/"convinteger" (what this onnxruntime build runs exactly) or "any"."""
    combos = {"qlinear": [(U8, U8), (S8, S8), (U8, S8)],
              "convinteger": [(U8, U8), (U8, S8), (S8, S8)],
              "any": [(U8, U8), (S8, S8), (U8, S8), (S8, U8)]}[kind]
    xd, wd = draw(st.sampled_from(combos))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layout = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if layout == "depthwise":
        groups, cg, og = draw(st.integers(1, 6)), 1, draw(st.integers(1, 2))
    else:
        groups = 1 if layout == "dense" else draw(st.integers(2, 3))
        cg, og = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    c, o = groups * cg, groups * og
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.lists(st.integers(0, 2), min_size=4, max_size=4)))
    hmin = max(1, dil[0] * (kh - 1) + 1 - pads[0] - pads[2])
    wmin = max(1, dil[1] * (kw - 1) + 1 - pads[1] - pads[3])
    h, wdt = draw(st.integers(hmin, hmin + 6)), draw(st.integers(wmin, wmin + 6))
    n = draw(st.integers(1, 2))
    xi, wi = np.iinfo(xd), np.iinfo(wd)
    extreme = draw(st.booleans())
    x = _codes(rng, xd, (n, c, h, wdt), xi.min, xi.max, extreme)
    wlo, whi = wi.min, wi.max
    if kind == "qlinear" and (xd, wd) == (U8, S8):
        wlo, whi = -64, 64  # the u8 x s8 kernel saturates beyond (see codec/qconv_ort.py)
    w = _codes(rng, wd, (o, cg, kh, kw), wlo, whi, extreme)
    wide = kind == "any" and draw(st.booleans())  # zero points outside the code range
    zlo, zhi = (-300, 300) if wide else (xi.min, xi.max)
    z_x = draw(st.integers(zlo, zhi))
    per_channel = draw(st.booleans())
    zlo, zhi = (-300, 300) if wide else (wi.min, wi.max)
    if per_channel and kind != "convinteger" and draw(st.booleans()):
        z_w = rng.integers(zlo, zhi + 1, o)
    else:
        z_w = np.full(o, draw(st.integers(zlo, zhi)))
    s_x = np.float32(rng.uniform(0.002, 0.1))
    if per_channel:
        wq = qt(w, rng.uniform(0.002, 0.05, o), z_w, axis=0)
    else:
        wq = qt(w, rng.uniform(0.002, 0.05), z_w[0])
    bias = draw(st.sampled_from([None, "int"]))
    b = None if bias is None else rng.integers(-2**20, 2**20, o).astype(np.int32)
    requant = kind != "convinteger" and (kind == "qlinear" or draw(st.booleans()))
    oi = np.iinfo(xd)
    out_scale = np.float32(rng.uniform(0.05, 4.0)) if requant else None
    out_zp = draw(st.integers(oi.min, oi.max)) if requant else None
    return Case(qt(x, s_x, z_x), wq, stride, pads, dil, groups, b, out_scale, out_zp,
                draw(st.booleans()))


# ------------------------------------------------------- onnxruntime conformance

def ort_qlinearconv(case: Case) -> np.ndarray:
    x, w = case.x, case.w
    o = w.codes.shape[0]
    pc = w.axis is not None
    consts = [_tensor("xs", np.asarray(x.scale, np.float32)),
              _tensor("xz", np.asarray(x.zero_point).astype(x.codes.dtype)),
              _tensor("w", w.codes),
              _tensor("ws", np.asarray(w.scale, np.float32).reshape([o] if pc else [])),
              _tensor("wz", np.asarray(w.zero_point).astype(w.codes.dtype).reshape(
                  [o] if pc else [])),
              _tensor("ys", np.asarray(case.out_scale, np.float32)),
              _tensor("yz", np.asarray(case.out_zp).astype(x.codes.dtype))]
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if case.bias is not None:
        consts.append(_tensor("b", case.bias))
        names.append("b")
    y = _run("QLinearConv", names, consts, x.codes, _tt(x.codes.dtype), case.attrs())
    if case.relu:  # QLinearConv has no fused ReLU: clamp at the output zero point
        y = np.maximum(y, np.asarray(case.out_zp).astype(y.dtype))
    return y


def ort_convinteger(case: Case) -> np.ndarray:
    x, w = case.x, case.w
    consts = [_tensor("w", w.codes),
              _tensor("xz", np.asarray(x.zero_point).astype(x.codes.dtype)),
              _tensor("wz", np.asarray(case.zw()[0]).astype(w.codes.dtype))]
    return _run("ConvInteger", ["x", "w", "xz", "wz"], consts, x.codes, TensorProto.INT32,
                case.attrs())


@needs_ort
@SETTINGS
@given(cases("qlinear"))
def test_requantized_matches_onnxruntime_qlinearconv(case: Case) -> None:
    y = qconv2d(case.x, case.w, **case.kwargs())
    expected = ort_qlinearconv(case)
    assert y.codes.dtype == expected.dtype
    np.testing.assert_array_equal(y.codes, expected)


@needs_ort
@SETTINGS
@given(cases("convinteger"))
def test_accumulator_matches_onnxruntime_convinteger(case: Case) -> None:
    acc = ort_convinteger(case)
    np.testing.assert_array_equal(accumulate(case.x, case.w, case.stride, case.pads, case.dil,
                                             case.groups), acc)
    s_x, _, s_w, _ = check_operands(case.x, case.w)
    y = qconv2d(case.x, case.w, **case.kwargs())
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, ref_float(acc.astype(np.int64), case.bias, s_x, s_w,
                                               case.relu))


@SETTINGS
@given(cases("any"))
def test_matches_int64_loop_reference(case: Case) -> None:
    """Every configuration, including ones onnxruntime cannot run (int8 x with uint8 w,
    zero points outside the code range, u8 x s8 with full-range weights)."""
    acc = case.ref_acc()
    np.testing.assert_array_equal(accumulate(case.x, case.w, case.stride, case.pads, case.dil,
                                             case.groups), acc)
    s_x, _, s_w, _ = check_operands(case.x, case.w)
    y = qconv2d(case.x, case.w, **case.kwargs())
    if case.out_scale is None:
        np.testing.assert_array_equal(y, ref_float(acc, case.bias, s_x, s_w, case.relu))
    else:
        np.testing.assert_array_equal(
            y.codes, ref_requant(acc, case.bias, s_x, s_w, case.out_scale, case.out_zp,
                                 case.x.signed, case.relu))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(cases("any"), st.sampled_from(["f32", "f64", "i64"]), st.sampled_from([1, 4, 10**9]))
def test_every_gemm_path_is_exact(case: Case, force: str, min_chunk: int) -> None:
    g = conv_geometry(case.x.codes.shape, case.w.codes.shape, case.stride, case.pads, case.dil,
                      case.groups)
    core, offset, _ = _accumulate(case.x, case.w, g, int(case.x.zero_point), case.zw(),
                                  force=force, min_chunk=min_chunk)  # type: ignore[arg-type]
    acc = core.astype(np.int64) + offset.astype(np.int64).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(acc, case.ref_acc())


@needs_ort
def test_padding_carries_the_zero_point_code() -> None:
    rng = np.random.default_rng(1)
    x = qt(rng.integers(0, 256, (1, 3, 5, 5)).astype(np.uint8), 0.05, 77)
    w = qt(rng.integers(-64, 65, (4, 3, 3, 3)).astype(np.int8), 0.01, 0)  # see S8_MAX_ABS
    case = Case(x, w, (1, 1), (2, 1, 0, 2), (1, 1), 1, None, np.float32(0.2), 3, False)
    acc = case.ref_acc()
    np.testing.assert_array_equal(accumulate(x, w, padding=(2, 1, 0, 2)), acc)
    np.testing.assert_array_equal(accumulate(x, w, padding=(2, 1, 0, 2)), ort_convinteger(case))
    np.testing.assert_array_equal(qconv2d(x, w, **case.kwargs()).codes, ort_qlinearconv(case))
    # padding with code 0 (real -77 * 0.05) would be wrong at the border
    zero_padded = np.pad(x.codes, ((0, 0), (0, 0), (2, 0), (1, 2)))
    wrong = ref_acc(zero_padded, w.codes, 77, np.zeros(4), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert not np.array_equal(wrong, acc)
    np.testing.assert_array_equal(wrong[:, :, 2:, 1:-2], acc[:, :, 2:, 1:-2])  # interior agrees


@pytest.mark.parametrize("zx", [0, 128, 255])
def test_large_k_takes_an_exact_path_where_plain_sgemm_is_not(zx: int) -> None:
    rng = np.random.default_rng(zx)
    # 512x3x3 taps of near-extreme odd/even codes far from z_x, one sign: |acc| >> 2**24
    far = 255 if zx < 128 else 1
    x = qt((far - rng.integers(0, 2, (1, 512, 6, 6))).astype(np.uint8), 0.02, zx)
    w = qt(rng.choice(np.array([-128, -127], np.int8), (8, 512, 3, 3)), 0.01, 0)
    g = conv_geometry(x.codes.shape, w.codes.shape, 1, 1, 1, 1)
    _, _, path = _accumulate(x, w, g, zx, np.zeros(8, np.int64))
    assert path != "f32"  # chunked float32 or float64
    acc = ref_acc(x.codes, w.codes, zx, np.zeros(8), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert np.abs(acc).max() > 2**24
    np.testing.assert_array_equal(accumulate(x, w, padding=1), acc)
    # the same product in one float32 GEMM loses bits
    xp = np.pad(x.codes.astype(np.float32) - zx, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    naive = np.einsum("nchwij,ocij->nohw", cols, w.codes.astype(np.float32), optimize=True)
    assert not np.array_equal(naive.astype(np.int64), acc)
    s_y, z_y = np.float32(150.0), 255 if zx < 128 else 0
    y = qconv2d(x, w, padding=1, out_scale=s_y, out_zero_point=z_y).codes
    np.testing.assert_array_equal(y, ref_requant(acc, None, 0.02, np.full(8, 0.01, np.float32),
                                                 s_y, z_y, False, False))
    np.testing.assert_array_equal(qconv2d(x, w, padding=1),
                                  ref_float(acc, None, 0.02, np.full(8, 0.01, np.float32), False))


def test_sparse_extreme_weights_chunk_by_l1_norm() -> None:
    rng = np.random.default_rng(5)
    x = qt(rng.integers(0, 256, (1, 512, 4, 4)).astype(np.uint8), 0.02, 0)
    wc = np.zeros((4, 512, 3, 3), np.int8)
    wc.reshape(4, -1)[:, ::97] = -128  # max |b| is 128, but each row's L1 norm is small
    w = qt(wc, 0.01, 0)
    g = conv_geometry(x.codes.shape, w.codes.shape, 1, 0, 1, 1)
    _, _, path = _accumulate(x, w, g, 0, np.zeros(4, np.int64))
    assert path == "f32"
    acc = ref_acc(x.codes, wc, 0, np.zeros(4), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    np.testing.assert_array_equal(accumulate(x, w), acc)


def _one_tap(codes: np.ndarray, s_x: float, s_w: float, s_y: float, bias: int,
             z_y: int) -> Case:
    """1x1 conv with weight code 1: the accumulator is the input code itself, plus bias."""
    x = qt(codes.reshape(1, 1, 16, 16), s_x, 0)
    w = qt(np.ones((1, 1, 1, 1), codes.dtype), s_w, 0)
    return Case(x, w, (1, 1), (0, 0, 0, 0), (1, 1), 1, np.array([bias], np.int32),
                np.float32(s_y), z_y, False)


def test_l1_split_checks_every_chunk() -> None:
    """Heavy weights in the first half of K: equal chunks sized from the total L1
    norm would overflow 2**24 in the first chunk and must be refused."""
    rng = np.random.default_rng(9)
    xc = rng.choice(np.array([254, 255], np.uint8), (1, 512, 4, 4))
    xc[0, 0, 0, 0] = 0  # keeps alpha = 128, amax = 128
    x = qt(xc, 0.02, 0)
    wc = np.zeros((2, 512, 3, 3), np.int8)
    wc[:, :256] = rng.choice(np.array([-128, -127], np.int8), (2, 256, 3, 3))
    w = qt(wc, 0.01, 0)
    acc = ref_acc(xc, wc, 0, np.zeros(2), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    np.testing.assert_array_equal(accumulate(x, w), acc)


@needs_ort
@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_requantization_rounds_half_to_even(dt: type) -> None:
    codes = np.arange(256).astype(dt)  # every code: odd ones land on .5 with M = 0.5
    case = _one_tap(codes, 1.0, 1.0, 2.0, 0, 0)
    y = qconv2d(case.x, case.w, **case.kwargs()).codes
    np.testing.assert_array_equal(y, ort_qlinearconv(case))
    acc = codes.astype(np.int64).reshape(1, 1, 16, 16)
    np.testing.assert_array_equal(y, np.rint(acc / 2).astype(dt))
    assert np.any(acc % 2 == 1)


@needs_ort
def test_requantization_uses_a_float32_multiplier() -> None:
    """Find scales where float32 arithmetic (M = float32(float32(s_x*s_w)/s_y), a
    float32 product) rounds some accumulator differently from float64 arithmetic with
    the exact or the float32 s_x*s_w; onnxruntime and qconv2d must round as float32."""
    rng = np.random.default_rng(7)
    acc = np.arange(256, dtype=np.int64)
    for _ in range(20000):
        s_x, s_w = np.float32(rng.uniform(0.01, 1)), np.float32(rng.uniform(0.01, 1))
        bias = int(rng.integers(10**4, 10**6))
        s_y = np.float32(float(s_x) * float(s_w) * (bias + 128) / rng.uniform(60, 120))
        m32 = np.float32(s_x * s_w) / s_y
        v32 = (acc + bias).astype(np.float32) * m32
        exact = (acc + bias) * (float(s_x) * float(s_w) / float(s_y))
        unit32 = (acc + bias) * (float(np.float32(s_x * s_w)) / float(s_y))
        r = np.rint(v32)
        alts = [np.rint(v) for v in (exact, unit32, exact.astype(np.float32),
                                     unit32.astype(np.float32))]
        if np.any(np.all([r != a for a in alts], axis=0)) and v32.max() < 250:
            break
    else:
        pytest.fail("no distinguishing scales found")
    case = _one_tap(acc.astype(np.uint8), s_x, s_w, s_y, bias, 0)
    y = qconv2d(case.x, case.w, **case.kwargs()).codes
    np.testing.assert_array_equal(y, ort_qlinearconv(case))
    np.testing.assert_array_equal(y.ravel(), np.rint(v32).astype(np.uint8))


@pytest.mark.parametrize("z", [2**20, 2**26, -2**30])
def test_huge_zero_points_stay_exact_or_are_refused(z: int) -> None:
    rng = np.random.default_rng(8)
    x = QTensor(codes=rng.integers(0, 256, (1, 2, 4, 4)).astype(np.uint8), method="linear",
                bits=8, scale=np.array(0.1, np.float32), zero_point=np.array(z, np.int32))
    for k in (1, 3):
        w = qt(rng.integers(-128, 128, (2, 2, k, k)).astype(np.int8), 0.1, -7)
        acc = ref_acc(x.codes, w.codes, z, np.full(2, -7), (1, 1), (1, 1, 1, 1), (1, 1), 1)
        np.testing.assert_array_equal(accumulate(x, w, padding=1), acc)
        np.testing.assert_array_equal(qconv2d_ort(x, w, padding=1), qconv2d(x, w, padding=1))
    w = QTensor(codes=w.codes, method="linear", bits=8, scale=np.array(0.1, np.float32),
                zero_point=np.array(-z, np.int32))
    if abs(z) >= 2**30:
        with pytest.raises(ValueError, match="overflow"):
            accumulate(x, w, padding=1)
    else:
        acc = ref_acc(x.codes, w.codes, z, np.full(2, -z), (1, 1), (1, 1, 1, 1), (1, 1), 1)
        np.testing.assert_array_equal(accumulate(x, w, padding=1), acc)


def test_weights_modified_in_place_are_not_served_stale() -> None:
    rng = np.random.default_rng(10)
    x = qt(rng.integers(0, 256, (1, 3, 5, 5)).astype(np.uint8), 0.1, 7)
    w = qt(rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), 0.01, 0)
    first = accumulate(x, w, padding=1)
    w.codes[...] = rng.integers(-128, 128, w.codes.shape)  # same array, new content
    acc = ref_acc(x.codes, w.codes, 7, np.zeros(4), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    np.testing.assert_array_equal(accumulate(x, w, padding=1), acc)
    assert not np.array_equal(first, acc)


def test_requantized_output_fields() -> None:
    rng = np.random.default_rng(2)
    w = qt(rng.integers(-128, 128, (2, 3, 1, 1)).astype(np.int8), 0.01, 0)
    for codes in (rng.integers(0, 256, (1, 3, 4, 4)).astype(np.uint8),
                  rng.integers(-128, 128, (1, 3, 4, 4)).astype(np.int8)):
        y = qconv2d(qt(codes, 0.1, 0), w, out_scale=0.5, out_zero_point=4)
        assert isinstance(y, QTensor)
        assert (y.method, y.bits, y.axis, y.codes.dtype) == ("linear", 8, None, codes.dtype)
        assert y.scale == np.float32(0.5) and int(y.zero_point) == 4


def test_float_bias_is_rounded_half_even_in_accumulator_units() -> None:
    rng = np.random.default_rng(3)
    x = qt(rng.integers(0, 256, (1, 2, 4, 4)).astype(np.uint8), 0.5, 9)
    w = qt(rng.integers(-128, 128, (3, 2, 3, 3)).astype(np.int8), [0.25, 0.5, 1.0], 0, axis=0)
    unit = np.float32(0.5) * np.array([0.25, 0.5, 1.0], np.float32)  # exact
    q = np.array([2, 3, -5], np.int32)  # ties: 2.5 -> 2, 3.5 -> 4, -4.5 -> -4
    fbias = ((q.astype(np.float64) + 0.5) * unit).astype(np.float32)
    q_rounded = np.array([2, 4, -4], np.int32)
    for kw in ({}, {"out_scale": 0.3, "out_zero_point": 1}):
        a = qconv2d(x, w, bias=fbias, padding=1, **kw)
        b = qconv2d(x, w, bias=q_rounded, padding=1, **kw)
        np.testing.assert_array_equal(getattr(a, "codes", a), getattr(b, "codes", b))


def test_symmetric_without_zero_point_and_float_relu() -> None:
    rng = np.random.default_rng(4)
    x = QTensor(codes=rng.integers(-128, 128, (1, 2, 5, 5)).astype(np.int8), method="symmetric",
                bits=8, scale=np.array(0.1, np.float32), zero_point=None)
    w = qt(rng.integers(-128, 128, (3, 2, 3, 3)).astype(np.int8), 0.02, 0, method="symmetric")
    y = qconv2d(x, w, relu=True)
    acc = ref_acc(x.codes, w.codes, 0, np.zeros(3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    np.testing.assert_array_equal(y, ref_float(acc, None, 0.1, np.full(3, 0.02, np.float32),
                                               True))
    assert y.min() == 0 and y.max() > 0


# ------------------------------------------------------------- ORT backend

@needs_ort
@settings(max_examples=60, deadline=None, derandomize=True)
@given(cases("any"))
def test_ort_backend_equals_numpy_backend(case: Case) -> None:
    expected = qconv2d(case.x, case.w, **case.kwargs())
    runs = [qconv2d_ort(case.x, case.w, **case.kwargs()),  # scales fed as inputs
            qconv2d_ort(case.x, case.w, **case.kwargs()),  # scales as constants
            qconv2d_ort(case.x, case.w, cache=False, **case.kwargs())]
    for y in runs:
        if case.out_scale is None:
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, expected)
        else:
            assert y.codes.dtype == expected.codes.dtype
            np.testing.assert_array_equal(y.codes, expected.codes)
            assert (y.scale, int(y.zero_point)) == (expected.scale, int(expected.zero_point))


@needs_ort
def test_ort_backend_reuses_sessions_across_shapes_and_scales() -> None:
    clear_cache()
    rng = np.random.default_rng(6)
    w = qt(rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), 0.01, 0)
    for shape in ((1, 3, 6, 6), (2, 3, 9, 7)):
        for s_x, z_x, s_y in ((0.1, 5, 0.7), (0.2, 250, 0.3), (0.1, 5, 0.7)):
            x = qt(rng.integers(0, 256, shape).astype(np.uint8), s_x, z_x)
            for kw in ({}, {"out_scale": s_y, "out_zero_point": 9, "relu": True}):
                a = qconv2d_ort(x, w, padding=1, intra_op_threads=2, **kw)
                b = qconv2d(x, w, padding=1, **kw)
                np.testing.assert_array_equal(getattr(a, "codes", a), getattr(b, "codes", b))
    (entry,) = _cache.values()  # one weight tensor: ConvInteger, QLinearConv fed and constant
    assert sum(s is not None for s in entry.sessions.values()) == len(entry.sessions) == 3


@needs_ort
def test_ort_backend_picks_up_weights_modified_in_place() -> None:
    rng = np.random.default_rng(11)
    x = qt(rng.integers(0, 256, (1, 3, 6, 6)).astype(np.uint8), 0.1, 7)
    w = qt(rng.integers(-60, 60, (4, 3, 3, 3)).astype(np.int8), 0.01, 0)
    kws: list[dict[str, Any]] = [{}, {"out_scale": 0.4, "out_zero_point": 2}]
    for _ in range(2):
        for kw in kws * 2:  # the second call of a set runs the constant-scale session
            a = qconv2d_ort(x, w, padding=1, **kw)
            b = qconv2d(x, w, padding=1, **kw)
            np.testing.assert_array_equal(getattr(a, "codes", a), getattr(b, "codes", b))
        w.codes[...] = rng.integers(-128, 128, w.codes.shape)  # now also needs uint8 weights


def test_missing_onnxruntime_raises_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = _ok()
    clear_cache()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match="ort"):
        qconv2d_ort(x, w, groups=2)


def test_ort_module_imports_onnxruntime_lazily() -> None:
    code = ("import sys, codec.qconv_ort; "
            "assert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------ errors

def _ok() -> tuple[QTensor, QTensor]:
    rng = np.random.default_rng(0)
    return (qt(rng.integers(0, 256, (1, 4, 5, 5)).astype(np.uint8), 0.1, 3),
            qt(rng.integers(-128, 128, (6, 2, 3, 3)).astype(np.int8), 0.01, 0))


def _bad_cases() -> list[tuple[str, Any, type[Exception]]]:
    x, w = _ok()  # valid with groups=2
    mulaw = QTensor(codes=x.codes, method="mulaw", bits=8, params={"mu": np.float32(255)})
    per_channel_x = qt(x.codes, np.full(4, 0.1), np.zeros(4), axis=1)
    return [
        ("nonlinear x", lambda f: f(mulaw, w, groups=2), ValueError),
        ("nonlinear w", lambda f: f(x, replace(mulaw, codes=w.codes), groups=2), ValueError),
        ("per-channel x", lambda f: f(per_channel_x, w, groups=2), ValueError),
        ("w axis 1", lambda f: f(x, qt(w.codes, np.full(2, 0.1), np.zeros(2), axis=1), groups=2),
         ValueError),
        ("not a QTensor", lambda f: f(x.codes, w, groups=2), TypeError),
        ("int16 codes", lambda f: f(replace(x, codes=x.codes.astype(np.int16)), w, groups=2),
         TypeError),
        ("float zero point", lambda f: f(replace(x, zero_point=np.array(3.0)), w, groups=2),
         TypeError),
        ("groups do not divide", lambda f: f(x, w, groups=3), ValueError),
        ("channel mismatch", lambda f: f(x, w, groups=1), ValueError),
        ("3-D x", lambda f: f(replace(x, codes=x.codes[0]), w, groups=2), ValueError),
        ("kernel too large", lambda f: f(x, qt(np.zeros((6, 2, 7, 7), np.int8), 0.1, 0),
                                         groups=2), ValueError),
        ("negative padding", lambda f: f(x, w, groups=2, padding=-1), ValueError),
        ("3 paddings", lambda f: f(x, w, groups=2, padding=(1, 1, 1)), ValueError),
        ("zero stride", lambda f: f(x, w, groups=2, stride=0), ValueError),
        ("float stride", lambda f: f(x, w, groups=2, stride=1.5), TypeError),
        ("zero dilation", lambda f: f(x, w, groups=2, dilation=(1, 0)), ValueError),
        ("bias shape", lambda f: f(x, w, groups=2, bias=np.zeros(5, np.int32)), ValueError),
        ("bias dtype", lambda f: f(x, w, groups=2, bias=np.zeros(6, np.int64)), TypeError),
        ("bias list", lambda f: f(x, w, groups=2, bias=[0] * 6), TypeError),
        ("bias overflow", lambda f: f(x, w, groups=2, bias=np.full(6, 1e9, np.float32)),
         ValueError),
        ("out zero point range", lambda f: f(x, w, groups=2, out_scale=0.1, out_zero_point=300),
         ValueError),
        ("out zero point alone", lambda f: f(x, w, groups=2, out_zero_point=3), ValueError),
        ("out scale <= 0", lambda f: f(x, w, groups=2, out_scale=0.0), ValueError),
    ]


@pytest.mark.parametrize("backend", [qconv2d, qconv2d_ort], ids=["numpy", "ort"])
@pytest.mark.parametrize("name,call,exc", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_errors(backend: Any, name: str, call: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        call(backend)


def test_valid_baseline_of_error_cases() -> None:
    x, w = _ok()
    assert qconv2d(x, w, groups=2).shape == (1, 6, 3, 3)


def test_uncached_weights_are_not_kept() -> None:
    from codec import qconv as qc
    rng = np.random.default_rng(7)
    x = QTensor(codes=rng.integers(0, 256, (1, 3, 5, 5), dtype=np.uint8), method="linear",
                bits=8, scale=np.float32(0.1), zero_point=np.array(7, np.int16))
    w = QTensor(codes=rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8), method="symmetric",
                bits=8, scale=np.float32(0.05), zero_point=np.array(0, np.int16))
    qc._prep_cache.clear()
    y0 = qc.qconv2d(x, w, cache=False)
    assert id(w.codes) not in qc._prep_cache
    assert np.array_equal(y0, qc.qconv2d(x, w))
    assert id(w.codes) in qc._prep_cache
