"""Clipping rules for fitting a mapping's range: ``minmax``, ``percentile`` and ``mse``.

Every mapping fits its range from the data (min/max, or max|x|). A clipping
rule picks a narrower range [lo, hi] (per tensor or per channel) and the
mapping is then fitted on the data clipped to it, so each method keeps its own
fitting logic (zero point on the grid, λ, β, ...) and values outside the range
saturate when quantized:

- ``minmax``: the whole range (the mappings' own default);
- ``percentile``: [P(100 − p), P(p)] of x for ``linear``, ±P(p) of |x| for the
  others (p = ``percentile``, default 99.99); a range that collapses to 0 keeps
  the full range;
- ``mse``: the range α·(full range), α searched on a geometric grid from 1 down
  to 1/100 (48 values) for the least mean squared error of *this* method at
  *this* bit width, per channel when per-channel. The error is measured on a
  deterministic strided sample of at most 65,536 values (at least 256 per
  channel) with the range's ends added, so the fitted range is the searched one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .mappings.base import Mapping, Params, other_axes

CLIPS = ("minmax", "percentile", "mse")
_GRID = np.geomspace(1.0, 0.01, 48)
_SAMPLE = 1 << 16


def check_rule(clip: Any, percentile: Any) -> tuple[str, float]:
    if clip is None:
        clip = "minmax"
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {list(CLIPS)}, got {clip!r}")
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"percentile must be a number, got {percentile!r}") from None
    if not 50.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {p}")
    return clip, p


def _bshape(ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _full_range(mapping: Mapping, x: np.ndarray, axis: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The mapping's unclipped range as (lo, hi), 0-d or per channel, float64."""
    red = other_axes(x.ndim, axis)
    mn = np.asarray(np.min(x, axis=red), np.float64)
    mx = np.asarray(np.max(x, axis=red), np.float64)
    if mapping.name == "linear":
        return np.minimum(mn, 0.0), np.maximum(mx, 0.0)
    a = np.maximum(np.abs(mn), np.abs(mx))
    return np.where(mn < 0, -a, 0.0), a


def _percentile_range(mapping: Mapping, x: np.ndarray, axis: int | None, p: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    rows = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(
        x.shape[axis], -1)
    lo_full, hi_full = _full_range(mapping, x, axis)
    if mapping.name == "linear":
        lo, hi = np.percentile(rows, [100.0 - p, p], axis=1)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    else:
        a = np.percentile(np.abs(rows), p, axis=1)
        lo, hi = np.where(lo_full.reshape(-1) < 0, -a, 0.0), a
    lo = lo.reshape(lo_full.shape)
    hi = hi.reshape(hi_full.shape)
    # A range that collapses (mostly zeros) would saturate every non-zero value: keep it full.
    dead = (hi - lo) <= 0
    return np.where(dead, lo_full, lo), np.where(dead, hi_full, hi)


def _sample(x: np.ndarray, axis: int | None) -> np.ndarray:
    """(S,) per tensor, (C, S) per channel: a deterministic strided sample."""
    if axis is None:
        flat = x.reshape(-1)
        return flat[:: max(1, flat.size // _SAMPLE)]
    rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    per = max(256, _SAMPLE // max(1, rows.shape[0]))
    return rows[:, :: max(1, rows.shape[1] // per)]


def _fit_range(mapping: Mapping, x: np.ndarray, bits: int, axis: int | None,
               signed: bool | None, opts: dict[str, Any], lo: np.ndarray, hi: np.ndarray
               ) -> tuple[bool, Params]:
    b = _bshape(x.ndim, axis)
    clipped = np.clip(x, np.reshape(lo, b).astype(np.float32),
                      np.reshape(hi, b).astype(np.float32))
    return mapping.fit(clipped, bits, axis, signed, opts)


def _mse_range(mapping: Mapping, x: np.ndarray, bits: int, axis: int | None,
               signed: bool | None, opts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    lo_full, hi_full = _full_range(mapping, x, axis)
    red = other_axes(x.ndim, axis)
    mn = np.asarray(np.min(x, axis=red), np.float64)
    mx = np.asarray(np.max(x, axis=red), np.float64)
    s = _sample(x, axis).astype(np.float32)
    s_axis = None if axis is None else 0
    col = (lambda v: np.reshape(v, (-1, 1))) if axis is not None else (lambda v: np.reshape(v, 1))
    best_err = np.full(np.shape(lo_full), np.inf)
    best = np.ones(np.shape(lo_full))
    for alpha in _GRID:
        lo, hi = alpha * lo_full, alpha * hi_full
        # The range's ends join the sample, so the fit sees exactly [lo, hi] (and the sign).
        ends = np.stack([np.maximum(mn, lo), np.minimum(mx, hi)], axis=-1)
        cl = np.clip(s, col(lo).astype(np.float32), col(hi).astype(np.float32))
        fit_in = np.concatenate([cl, ends.astype(np.float32).reshape(
            (-1, 2) if axis is not None else (2,))], axis=-1)
        try:
            is_signed, params = mapping.fit(fit_in, bits, s_axis, signed, opts)
            lo_b, hi_b = mapping.bit_range(is_signed)
            if not lo_b <= bits <= hi_b:
                continue
            mapping.check(params, bits, is_signed)
            codes = mapping.quantize(s, bits, s_axis, is_signed, params)
            y = mapping.dequantize(codes, bits, s_axis, is_signed, params)
        except ValueError:
            continue
        err = np.sum((y.astype(np.float64) - s) ** 2, axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, alpha, best)
    return best * lo_full, best * hi_full


def fit(mapping: Mapping, x: np.ndarray, bits: int, axis: int | None, signed: bool | None,
        opts: dict[str, Any], clip: str, percentile: float) -> tuple[bool, Params]:
    """The mapping's parameters fitted under a clipping rule (``x`` finite float32)."""
    if clip == "minmax" or x.size == 0:
        return mapping.fit(x, bits, axis, signed, opts)
    if clip == "percentile":
        lo, hi = _percentile_range(mapping, x, axis, percentile)
    else:
        lo, hi = _mse_range(mapping, x, bits, axis, signed, opts)
    return _fit_range(mapping, x, bits, axis, signed, opts, lo, hi)
