"""Benchmark qconv2d against a float32 numpy conv and onnxruntime's QLinearConv.

Single-threaded, same data for every contender, median of repeated runs after
warm-up; prints a Markdown table. Run from the repo root:

    .venv/bin/python bench/qconv.py [--repeat N]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from codec.qconv import qconv2d  # noqa: E402
from codec.qconv_ort import qconv2d_ort  # noqa: E402
from codec.qtensor import QTensor  # noqa: E402

# name, x shape, w shape, padding, groups, weight code range
CASES = [
    ("1x64x56x56 * 64x64x3x3, pad 1", (1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 64),
    ("1x256x14x14 * 256x256x3x3, pad 1", (1, 256, 14, 14), (256, 256, 3, 3), 1, 1, 64),
    ("depthwise 1x256x28x28 * 256x1x3x3, pad 1", (1, 256, 28, 28), (256, 1, 3, 3), 1, 256, 64),
    ("same, full-range uniform w (ORT alone inexact)", (1, 256, 14, 14), (256, 256, 3, 3), 1, 1,
     128),
]


def float_conv(x: np.ndarray, w: np.ndarray, padding: int, groups: int) -> np.ndarray:
    """Plain float32 im2col + matmul convolution, stride 1 (the baseline)."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    oh, ow = win.shape[2:4]
    cols = np.ascontiguousarray(win.reshape(n, groups, cg, oh, ow, kh, kw)
                                .transpose(0, 1, 2, 5, 6, 3, 4)).reshape(n, groups, -1, oh * ow)
    return np.matmul(w.reshape(groups, o // groups, -1), cols).reshape(n, o, oh, ow)


def ort_qlinearconv(x: QTensor, w: QTensor, bias: np.ndarray, padding: int, groups: int,
                    s_y: float, z_y: int) -> Callable[[], np.ndarray]:
    """A session with everything but x constant: onnxruntime's best case."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    o = w.codes.shape[0]
    consts = [
        h.make_tensor("xs", T.FLOAT, [], [float(x.scale)]),
        h.make_tensor("xz", T.UINT8, [], np.array(x.zero_point, np.uint8).tobytes(), raw=True),
        h.make_tensor("w", T.INT8, w.codes.shape, w.codes.tobytes(), raw=True),
        h.make_tensor("ws", T.FLOAT, [o], w.scale.tobytes(), raw=True),
        h.make_tensor("wz", T.INT8, [o], np.zeros(o, np.int8).tobytes(), raw=True),
        h.make_tensor("ys", T.FLOAT, [], [s_y]),
        h.make_tensor("yz", T.UINT8, [], np.array(z_y, np.uint8).tobytes(), raw=True),
        h.make_tensor("b", T.INT32, [o], bias.tobytes(), raw=True)]
    node = h.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                       pads=[padding] * 4, group=groups)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.UINT8, x.codes.shape)],
                         [h.make_tensor_value_info("y", T.UINT8, None)], consts)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x.codes})[0]


def medians_ms(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median time of each function; rounds interleave them so load noise hits all alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_case(xshape: tuple[int, ...], wshape: tuple[int, ...], padding: int, groups: int,
             wmax: int, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    # post-ReLU-like uint8 activations; symmetric per-channel int8 weights
    x = QTensor(codes=rng.integers(0, 256, xshape, dtype=np.uint8), method="linear", bits=8,
                scale=np.array(0.05, np.float32), zero_point=np.array(3, np.int16))
    if wmax == 128:
        wc = rng.integers(-128, 128, wshape).astype(np.int8)
    else:  # bell-shaped, 7-bit (onnxruntime's reduce_range for u8 x s8)
        wc = np.clip(np.rint(rng.normal(0, wmax / 3, wshape)), -wmax, wmax - 1).astype(np.int8)
    o = wshape[0]
    w = QTensor(codes=wc, method="symmetric", bits=8, axis=0,
                scale=rng.uniform(0.002, 0.01, o).astype(np.float32),
                zero_point=np.zeros(o, np.int16))
    bias = rng.integers(-1000, 1000, o).astype(np.int32)
    xf = ((x.codes.astype(np.float32) - 3) * x.scale).astype(np.float32)
    wf = (wc * w.scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    s_y, z_y = 0.1, 7
    req: dict[str, Any] = dict(bias=bias, padding=padding, groups=groups, out_scale=s_y,
                               out_zero_point=z_y)
    ref = qconv2d(x, w, **req).codes
    assert np.array_equal(qconv2d_ort(x, w, **req).codes, ref)
    ort_alone = ort_qlinearconv(x, w, bias, padding, groups, s_y, z_y)
    if wmax <= 64:  # beyond, onnxruntime's u8 x s8 kernel saturates (qconv2d_ort feeds u8 w)
        assert np.array_equal(ort_alone(), ref)
    flt: dict[str, Any] = dict(bias=bias, padding=padding, groups=groups)
    assert np.array_equal(qconv2d_ort(x, w, **flt), qconv2d(x, w, **flt))
    return medians_ms({
        "float32 numpy conv": lambda: float_conv(xf, wf, padding, groups),
        "qconv2d numpy (float out)": lambda: qconv2d(x, w, **flt),
        "qconv2d numpy (requant)": lambda: qconv2d(x, w, **req),
        "qconv2d ORT (float out)": lambda: qconv2d_ort(x, w, **flt),
        "qconv2d ORT (requant)": lambda: qconv2d_ort(x, w, **req),
        "ORT QLinearConv": ort_alone,
    }, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    import onnxruntime
    print(f"numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, 1 thread, "
          f"median of {args.repeat} runs (ms)\n")
    cols = ["float32 numpy conv", "qconv2d numpy (float out)", "qconv2d numpy (requant)",
            "qconv2d ORT (float out)", "qconv2d ORT (requant)", "ORT QLinearConv"]
    print("| case | " + " | ".join(cols)
          + " | numpy float out / float32 | numpy requant / float32 | ORT path / ORT |")
    print("|---" * (len(cols) + 4) + "|")
    for name, xs, ws, pad, groups, wmax in CASES:
        r = run_case(xs, ws, pad, groups, wmax, args.repeat)
        ratios = (r["qconv2d numpy (float out)"] / r["float32 numpy conv"],
                  r["qconv2d numpy (requant)"] / r["float32 numpy conv"],
                  r["qconv2d ORT (requant)"] / r["ORT QLinearConv"])
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " | "
              + " | ".join(f"{q:.2f}" for q in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
