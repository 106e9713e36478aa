"""Write the golden streams: ``python tests/golden/make.py``.

It writes only the files of cases that have none yet (new cases) and checks that every
existing stream is still byte for byte what the encoder writes, so adding a case never
rewrites a pinned stream. A deliberate format change bumps the version and starts a new
folder; the streams of earlier versions must stay and keep decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import codec

HERE = Path(__file__).parent
VERSION_DIR = HERE / "v1"

# (name, method, bits, axis, params, input maker)
CASES = [
    ("linear_b8_tensor", "linear", 8, None, {}, "gauss"),
    ("linear_b3_channel", "linear", 3, 1, {}, "gauss"),
    ("linear_b1_tensor", "linear", 1, None, {}, "relu"),
    ("linear_b8_given_int8", "linear", 8, None,
     {"scale": 0.03125, "zero_point": -3, "signed": True}, "gauss"),
    ("symmetric_b4_tensor", "symmetric", 4, None, {}, "gauss"),
    ("symmetric_b8_restricted_channel", "symmetric", 8, 0, {"restricted": True}, "gauss"),
    ("symmetric_b5_unsigned", "symmetric", 5, None, {}, "relu"),
    ("mulaw_b8_standard", "mulaw", 8, None, {"mu": 255, "max_abs": 1.0}, "unit"),
    ("mulaw_b4_relu_channel", "mulaw", 4, 1, {}, "relu"),
    ("log_b6_tensor", "log", 6, None, {}, "gauss"),
    ("log_b2_relu", "log", 2, None, {}, "relu"),
    ("exp_b7_channel", "exp", 7, 1, {}, "laplace"),
    ("exp_b3_relu", "exp", 3, None, {}, "relu"),
    # The lossless stage (coding byte (coder << 4) | predictor); rANS only: its output is
    # fixed by the format, a zstd compressor's may change between zstd releases.
    ("linear_b4_ans", "linear", 4, None, {"entropy": "ans", "predictor": "none"}, "relu_big"),
    ("exp_b6_ans_lorenzo_channel", "exp", 6, 1, {"entropy": "ans", "predictor": "lorenzo"},
     "smooth"),
    ("symmetric_b8_ans_delta", "symmetric", 8, None, {"entropy": "ans", "predictor": "delta"},
     "smooth"),
    ("log_b3_ans_lorenzo_relu", "log", 3, None, {"entropy": "ans", "predictor": "lorenzo"},
     "smooth_relu"),
    ("mulaw_b5_ans_unsigned_constant", "mulaw", 5, None, {"entropy": "ans"}, "constant"),
]


def make_input(kind: str) -> np.ndarray:
    rng = np.random.default_rng(20261125)
    shape = (2, 3, 4, 5)
    if kind == "gauss":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "relu":
        return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=shape).astype(np.float32)
    if kind == "unit":
        return rng.uniform(-1, 1, shape).astype(np.float32)
    if kind == "relu_big":
        return np.maximum(rng.standard_normal((4, 8, 16)), 0).astype(np.float32)
    if kind in ("smooth", "smooth_relu"):  # a spatially smooth feature map
        x = np.cumsum(np.cumsum(rng.standard_normal((2, 3, 16, 16)), axis=-1), axis=-2) / 8
        return (np.maximum(x, 0) if kind == "smooth_relu" else x).astype(np.float32)
    if kind == "constant":
        return np.full((16, 16), 0.5, np.float32)
    raise ValueError(kind)


def main() -> None:
    VERSION_DIR.mkdir(parents=True, exist_ok=True)
    index = []
    for name, method, bits, axis, params, kind in CASES:
        x = make_input(kind)
        blob = codec.encode(x, method, bits, axis, **params)
        fcq, npy = VERSION_DIR / f"{name}.fcq", VERSION_DIR / f"{name}.npy"
        if fcq.exists():  # pinned: never rewritten
            if fcq.read_bytes() != blob or not np.array_equal(np.load(npy), x):
                raise SystemExit(f"{name}: the encoder no longer writes the pinned stream")
        else:
            if "entropy" in params and not blob[7]:
                raise SystemExit(f"{name}: the lossless stage did not pay off; pick other data")
            np.save(npy, x, allow_pickle=False)
            fcq.write_bytes(blob)
        index.append({"name": name, "method": method, "bits": bits, "axis": axis,
                      "params": params})
    (VERSION_DIR / "cases.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
