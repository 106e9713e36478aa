"""Benchmark a registered layer's conv2d on the service against onnxruntime QLinearConv alone.

Starts ``featcodec serve`` (onnxruntime backend, one worker) with a temporary
layers directory, registers the 64x64x3x3 layer of bench/qconv.py's first case
(symmetric per-channel int8 weights, int32 bias, padding 1), and posts the same
1x64x56x56 uint8 activation bitstream to ``POST /v1/layers/{name}/conv2d`` with
requantized output. The service's compute time is read from the response's
``Server-Timing`` header (measured inside the handler's worker thread):
``conv`` is the qconv2d_ort call alone, ``handler`` adds the layer lookup, the
activation decode and the response encoding. Each request alternates with one
run of a bare onnxruntime QLinearConv session (every parameter constant, one
thread, in this process), so load changes hit both alike; medians are printed.

    .venv/bin/python bench/layer_conv.py [--repeat N] [--vary-scale]

``--vary-scale`` gives every request a different activation scale, as when
activations are calibrated per request: onnxruntime then runs a session that
takes the scales as inputs (docs/QCONV.md), not the all-constant one.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS (the server inherits it too)

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
import codec  # noqa: E402
from codec.qtensor import QTensor  # noqa: E402
from conftest import Server  # noqa: E402  (tests/conftest.py: a `featcodec serve` process)
from qconv import ort_qlinearconv  # noqa: E402  (bench/qconv.py)

XSHAPE, WSHAPE, PADDING = (1, 64, 56, 56), (64, 64, 3, 3), 1
S_Y, Z_Y = 0.1, 7


def operands() -> tuple[QTensor, QTensor, np.ndarray]:
    """bench/qconv.py's data: uint8 activations (zero point 3), bell-shaped 7-bit int8
    per-channel weights, int32 bias."""
    rng = np.random.default_rng(0)
    x = QTensor(codes=rng.integers(0, 256, XSHAPE, dtype=np.uint8), method="linear", bits=8,
                scale=np.array(0.05, np.float32), zero_point=np.array(3, np.int16))
    wc = np.clip(np.rint(rng.normal(0, 64 / 3, WSHAPE)), -64, 63).astype(np.int8)
    o = WSHAPE[0]
    w = QTensor(codes=wc, method="symmetric", bits=8, axis=0,
                scale=rng.uniform(0.002, 0.01, o).astype(np.float32),
                zero_point=np.zeros(o, np.int16))
    bias = rng.integers(-1000, 1000, o).astype(np.int32)
    return x, w, bias


def server_timing(header: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+);dur=([0-9.]+)", header)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--vary-scale", action="store_true",
                    help="a different activation scale in every request")
    args = ap.parse_args()

    x, w, bias = operands()
    ort_alone = ort_qlinearconv(x, w, bias, PADDING, 1, S_Y, Z_Y)
    rng = np.random.default_rng(1)

    def x_blob(i: int) -> tuple[bytes, QTensor]:
        if not args.vary_scale:
            return codec.encode_qtensor(x), x
        xi = QTensor(codes=x.codes, method="linear", bits=8,
                     scale=np.array(rng.uniform(0.04, 0.06), np.float32),
                     zero_point=x.zero_point)
        return codec.encode_qtensor(xi), xi

    with tempfile.TemporaryDirectory() as layers_dir:
        server = Server(FEATCODEC_LAYERS_DIR=layers_dir, FEATCODEC_OPEN_LAYER_WRITES="true",
                        FEATCODEC_CONV_BACKEND="ort", FEATCODEC_LOG_LEVEL="warning")
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=60) as c:
                body = msgpack.packb({"w": codec.encode_qtensor(w),
                                      "bias": {"dtype": "int32", "shape": [WSHAPE[0]],
                                               "data": bias.tobytes()},
                                      "padding": PADDING}, use_bin_type=True)
                r = c.put("/v1/layers/bench", content=body,
                          headers={"Content-Type": "application/msgpack"})
                r.raise_for_status()
                params = {"out_scale": S_Y, "out_zero_point": Z_Y}

                def request(i: int) -> dict[str, float]:
                    blob, xi = x_blob(i)
                    r = c.post("/v1/layers/bench/conv2d", content=blob, params=params,
                               headers={"Content-Type": "application/octet-stream"})
                    r.raise_for_status()
                    if i < 3:  # the service's answer is qconv2d's, byte for byte
                        ref = codec.qconv2d(xi, w, bias, padding=PADDING, out_scale=S_Y,
                                            out_zero_point=Z_Y)
                        assert r.content == codec.encode_qtensor(ref)
                    assert r.headers["x-conv-backend"] == "ort"
                    t = server_timing(r.headers["server-timing"])
                    t["handler"] = sum(t.values())
                    return t

                assert np.array_equal(ort_alone(), codec.qconv2d(
                    x, w, bias, padding=PADDING, out_scale=S_Y, out_zero_point=Z_Y).codes)
                for i in range(5):  # warm-up: sessions built, caches filled
                    request(i)
                    ort_alone()
                steps: dict[str, list[float]] = {}
                ort: list[float] = []
                for i in range(args.repeat):
                    for name, ms in request(i + 5).items():
                        steps.setdefault(name, []).append(ms)
                    t0 = time.perf_counter()
                    ort_alone()
                    ort.append((time.perf_counter() - t0) * 1e3)
        finally:
            server.stop()

    import onnxruntime
    med = {name: statistics.median(v) for name, v in steps.items()}
    m_conv, m_handler, m_ort = med["conv"], med["handler"], statistics.median(ort)
    print(f"numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, 1 thread, median "
          f"of {args.repeat} interleaved runs (ms); activation scale "
          f"{'varies per request' if args.vary_scale else 'constant'}\n")
    print("| 1x64x56x56 * 64x64x3x3, pad 1, requantized | ms | / ORT QLinearConv |")
    print("|---|---|---|")
    print(f"| ORT QLinearConv alone (all constant) | {m_ort:.3f} | 1.00 |")
    print(f"| service conv (qconv2d_ort in the handler) | {m_conv:.3f} | {m_conv / m_ort:.2f} |")
    print(f"| service handler (load + decode + conv + encode) | {m_handler:.3f} | "
          f"{m_handler / m_ort:.2f} |")
    print("\nhandler steps (median ms): "
          + ", ".join(f"{n} {med[n]:.3f}" for n in ("load", "decode", "conv", "encode")))


if __name__ == "__main__":
    main()
