"""Exponential companding: c(x) = sign(x)·(1 − e^(−|x|/λ))/(1 − e^(−r/λ)).

c is the CDF of an exponential distribution with mean λ (renormalised to
[0, r]), so for exponential or Laplacian data the uniform bins on c are near
equal-probability when λ = mean|x|. Those bins are not the ones with least
error: the MSE-optimal compander has slope ∝ p^(1/3) (Panter–Dite), which for
p ∝ e^(−|x|/m) is this curve with λ = 3m. So λ is fitted as 3·mean|x| by
default (``lam_fit="mse"``) and as mean|x| with ``lam_fit="equiprobable"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Param, Params, as_param, channels
from .blocks import mean_abs
from .compander import Compander

_LAM_FIT = {"mse": 3.0, "equiprobable": 1.0}

_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


class Exp(Compander):
    name = "exp"
    id = 5
    summary = "exponential compander: near equal-probability bins for Laplacian/exponential data"
    params = (
        Param("lam", "<f4", True, "decay λ > 0 (fitted as mean|x|)"),
        Param("max_abs", "<f4", True, "input range r; |x| > r saturates"),
    )
    options = {
        "lam": "decay λ (scalar or per channel); default fitted by lam_fit",
        "lam_fit": "'mse' (default): λ = 3·mean|x|, least error for Laplacian data; "
                   "'equiprobable': λ = mean|x|, equal-probability bins",
        "max_abs": "input range r (scalar or per channel); default max|x|",
        "signed": "sign-carrying variant; default: unsigned when the data is non-negative",
    }

    zero_range = float(np.finfo(np.float32).smallest_subnormal)  # see Compander

    def fit_extra(self, x: np.ndarray, axis: int | None, bits: int, signed: bool,
                  max_abs: np.ndarray, opts: dict[str, Any]) -> Params:
        if opts.get("lam") is not None:
            return {"lam": as_param(opts["lam"], "lam", np.float32, axis, channels(x, axis))}
        rule = opts.get("lam_fit", "mse")
        if rule not in _LAM_FIT:
            raise ValueError(f"lam_fit must be one of {sorted(_LAM_FIT)}, got {rule!r}")
        lam = np.minimum(_LAM_FIT[rule] * mean_abs(x, axis), _F32_MAX)  # 3·mean|x| can pass it
        return {"lam": np.where(lam > 0, lam, max_abs).astype(np.float32)}

    def wants_abs_sum(self, axis: int | None, opts: dict[str, Any]) -> bool:
        return axis is None and opts.get("lam") is None

    def check(self, params: Params, bits: int, signed: bool) -> None:
        super().check(params, bits, signed)
        if np.any(params["lam"] <= 0):
            raise ValueError("lam must be > 0")

    def compress(self, a: np.ndarray, p: dict[str, np.ndarray]) -> None:
        lam = p["lam"].astype(np.float64)
        k = 1.0 / lam
        if np.all((k >= _F32_TINY) & (k <= _F32_MAX)):
            a *= (-k).astype(np.float32)
        else:  # 1/λ is no normal float32 (tiny λ): 0·inf would be NaN
            a /= -p["lam"]
        np.expm1(a, out=a)
        a *= (1.0 / np.expm1(-p["max_abs"] / lam)).astype(np.float32)

    def expand(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        lam = p["lam"]
        return -lam * np.log1p(c * np.expm1(-p["max_abs"] / lam))
