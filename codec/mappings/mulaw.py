"""μ-law companding: c(x) = sign(x)·ln(1 + μ|x|/r)/ln(1 + μ).

With signed data the levels are torchaudio's continuous μ-law grid
(``mu_law_encoding``/``mu_law_decoding``), except that ties round half to
even rather than half up and |x| > r saturates instead of overflowing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Param, Params
from .compander import Compander

_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


class MuLaw(Compander):
    name = "mulaw"
    id = 3
    summary = "μ-law compander: fine levels near 0, coarse in the tails (Gaussian-like data)"
    params = (
        Param("mu", "<f4", False, "compression μ > 0"),
        Param("max_abs", "<f4", True, "input range r; |x| > r saturates"),
    )
    options = {
        "mu": "compression μ (default 255)",
        "max_abs": "input range r (scalar or per channel); default max|x|",
        "signed": "sign-carrying variant; default: unsigned when the data is non-negative",
    }

    zero_range = float(np.finfo(np.float32).smallest_subnormal)  # see Compander

    def fit_extra(self, x: np.ndarray, axis: int | None, bits: int, signed: bool,
                  max_abs: np.ndarray, opts: dict[str, Any]) -> Params:
        mu = opts.get("mu")
        return {"mu": np.asarray(255.0 if mu is None else mu, np.float32).reshape(())}

    def check(self, params: Params, bits: int, signed: bool) -> None:
        super().check(params, bits, signed)
        if params["mu"].ndim != 0 or not params["mu"] > 0:
            raise ValueError("mu must be a scalar > 0")

    def compress(self, a: np.ndarray, p: dict[str, np.ndarray]) -> None:
        mu = np.float64(p["mu"])
        k = _factor(p)
        if k is not None:
            a *= k
        else:  # μ/r is no normal float32 (tiny r, e.g. subnormal data): 0·inf would be NaN
            a /= p["max_abs"]
            a *= np.float32(mu)
        np.log1p(a, out=a)
        a *= np.float32(1.0 / np.log1p(mu))

    def input_scale(self, params: Params) -> tuple[np.ndarray, Params] | None:
        # compress multiplies by μ/r, then depends on μ alone; with r = μ the factor is 1.
        k = _factor(params)
        if k is None:
            return None
        mu = np.asarray(params["mu"], np.float32).reshape(())
        return k, {"mu": mu, "max_abs": mu}

    separable = True  # μ is per tensor: only r varies by channel

    def expand(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        return self.expand_scaled(self.expand_unit(c, p), p)

    def expand_unit(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        return np.expm1(c * np.log1p(p["mu"]))

    def expand_scaled(self, u: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        return p["max_abs"] * u / p["mu"]


def _factor(p: Params) -> np.ndarray | None:
    """compress's first factor μ/r (float32), or None when it is no normal float32."""
    k = np.float64(p["mu"]) / np.asarray(p["max_abs"], np.float64)
    return k.astype(np.float32) if np.all((k >= _F32_TINY) & (k <= _F32_MAX)) else None
