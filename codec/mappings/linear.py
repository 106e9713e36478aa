"""Uniform affine ("asymmetric") quantization: x̂ = (x_Q − z)·Δ.

Fitted range: [min(x, 0), max(x, 0)] so that 0 is exactly representable.
The zero point is rounded first and Δ then chosen so the whole range lies on
the grid, which keeps every in-range error within Δ/2 (the textbook order,
Δ first then z, can push max(x) up to Δ outside the grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import uniform
from .base import (Param, Params, as_param, below_overflow, channels, code_range,
                   every, fit_ops, min_max, positive_scale, scalars, some)

_F32_MAX = float(np.finfo(np.float32).max)


class Linear(uniform.UniformMapping):
    name = "linear"
    id = 1
    linear = True
    summary = "uniform affine quantizer with scale and zero point; codes can be computed on"
    params = (
        Param("scale", "<f4", True, "step Δ"),
        Param("zero_point", "<i2", True, "code of real 0"),
    )
    options = {
        "scale": "step Δ (scalar or one per channel); given means no calibration",
        "zero_point": "code of real 0 (default 0 when scale is given)",
        "signed": "int8-style codes in [-N/2, N/2-1] instead of [0, N-1]",
    }

    def bit_range(self, signed: bool) -> tuple[int, int]:
        return (1, 8)

    def fit(self, x: np.ndarray, bits: int, axis: int | None, signed: bool | None,
            opts: dict[str, Any]) -> tuple[bool, Params]:
        signed = bool(signed)
        lo, hi = code_range(bits, signed)
        c = channels(x, axis)
        if opts.get("scale") is not None:
            scale = as_param(opts["scale"], "scale", np.float32, axis, c)
            zp = opts.get("zero_point")
            zero_point = as_param(0 if zp is None else zp, "zero_point", np.float64, axis, c)
            if np.any(zero_point != np.round(zero_point)) or np.any(zero_point < lo) \
                    or np.any(zero_point > hi):
                raise ValueError(f"zero_point must be an integer in [{lo}, {hi}]")
            return signed, {"scale": scale, "zero_point": zero_point.astype(np.int16)}
        if opts.get("zero_point") is not None:
            raise ValueError("zero_point is only accepted together with scale")
        dmin, dmax = scalars(*min_max(x, axis))
        op = fit_ops(dmin)
        mn, mx = op.minimum(dmin, 0.0), op.maximum(dmax, 0.0)
        levels = float(hi - lo)
        rng = mx - mn
        # (Every divisor is >= 1 or a positive range: no division by zero.)
        z = op.minimum(op.maximum(op.rint(-mn * levels / op.where(rng > 0, rng, 1.0)), 0.0),
                       levels)
        # z rounded to an end of the code range leaves the other side of 0 with
        # no level but 0 itself: Δ >= 2·|that side| keeps it within Δ/2.
        up = op.where(z < levels, mx / op.maximum(levels - z, 1.0), 2.0 * mx)
        down = op.where(z > 0, -mn / op.maximum(z, 1.0), -2.0 * mn)
        step = op.minimum(op.maximum(up, down), _F32_MAX)  # 1 bit near FLT_MAX: no inf Δ
        # A constant channel c: Δ = |c| puts c exactly on the grid (code z ± 1).
        const = (dmin == dmax) & (dmin != 0)
        step = op.where(const, op.abs(dmin), step)
        z = op.where(const, (dmin < 0) * 1.0, z)
        scale = below_overflow(positive_scale(step), op.maximum(-dmin, dmax))
        return signed, {"scale": scale, "zero_point": np.asarray(z + lo).astype(np.int16)}

    def check(self, params: Params, bits: int, signed: bool) -> None:
        scale, zp = params["scale"], params["zero_point"]
        if not every(np.isfinite(scale) & (scale > 0)):
            raise ValueError("scale must be finite and > 0")
        lo, hi = code_range(bits, signed)
        if some(zp < lo) or some(zp > hi):
            raise ValueError(f"zero_point must lie in the code range [{lo}, {hi}]")

    def grid(self, params: Params, bits: int, signed: bool, restricted: bool
             ) -> tuple[np.ndarray, int, int]:
        lo, hi = code_range(bits, signed)
        return params["zero_point"], lo, hi
