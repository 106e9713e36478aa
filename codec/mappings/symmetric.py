"""Symmetric quantization: zero point 0, x̂ = x_Q·Δ.

Signed codes use [-N/2, N/2-1] (the seed's range) or, with ``restricted``,
[-(N/2-1), N/2-1] as TFLite weights do; non-negative data gets unsigned
codes [0, N-1] so no level is wasted on a sign.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import uniform
from .base import (Param, Params, as_param, below_overflow, channels, code_range,
                   every, fit_ops, has_negative, min_max, positive_scale, scalars, some)

_ZERO = np.zeros((), np.int16)


class Symmetric(uniform.UniformMapping):
    name = "symmetric"
    id = 2
    linear = True
    summary = "uniform quantizer centred on 0 (zero point 0); codes can be computed on"
    params = (Param("scale", "<f4", True, "step Δ"),)
    options = {
        "scale": "step Δ (scalar or one per channel); given means no calibration",
        "signed": "signed codes; default: unsigned when the data is non-negative",
        "restricted": "signed range [-(N/2-1), N/2-1] (TFLite weights)",
    }

    def fit(self, x: np.ndarray, bits: int, axis: int | None, signed: bool | None,
            opts: dict[str, Any]) -> tuple[bool, Params]:
        if opts.get("scale") is not None:
            # Nothing to fit but the sign, which ±inf (saturated later) does not hide.
            signed = has_negative(x) if signed is None else signed
            return signed, {"scale": as_param(opts["scale"], "scale", np.float32, axis,
                                              channels(x, axis))}
        dmin, dmax = min_max(x, axis)
        if signed is None:
            signed = some(dmin < 0)
        lo, hi = code_range(bits, signed)
        dmin, dmax = scalars(dmin, dmax)
        op = fit_ops(dmin)
        amax = op.maximum(op.abs(dmin), op.abs(dmax)) if signed else op.maximum(dmax, 0.0)
        # hi is N/2-1 signed (restricted or not), N-1 unsigned; 0 (1-bit signed) is
        # refused after the fit.
        step = amax / max(hi, 1)
        # A constant channel c: Δ = |c| makes c a level exactly (code ±1).
        const = (dmin == dmax) & (dmin != 0)
        step = op.where(const, op.abs(dmin), step)
        return signed, {"scale": below_overflow(positive_scale(step), amax)}

    def check(self, params: Params, bits: int, signed: bool) -> None:
        if not every(np.isfinite(params["scale"]) & (params["scale"] > 0)):
            raise ValueError("scale must be finite and > 0")

    def grid(self, params: Params, bits: int, signed: bool, restricted: bool
             ) -> tuple[np.ndarray, int, int]:
        lo, hi = code_range(bits, signed)
        return _ZERO, (lo + 1 if signed and restricted else lo), hi
