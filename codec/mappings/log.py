"""Logarithmic quantization: |x̂| ∈ {r·β^(−j)} ∪ {0}, sign kept.

Levels are geometric, so the relative error is the same at every magnitude.
Magnitudes round in the log domain between levels (geometric midpoints);
below the smallest level s they go to the exact zero when |x| < s/2.
Unsigned codes k ∈ [0, N−1] (k = 0 is zero); signed codes are ±k with
k ≤ N/2 − 1. β is fitted by trying the dynamic ranges that put the smallest
level at a few low quantiles of |x| and keeping the one with least error
on a deterministic sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Param, Params, as_param, channels
from .blocks import CHUNK, iter_blocks, pick
from .compander import Compander

_F32_MAX = float(np.finfo(np.float32).max)
_QUANTILES = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 35.0)
_SAMPLE = 4096


def _magnitudes(bits: int, signed: bool) -> int:
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def _index(a: np.ndarray, log_r: np.ndarray, log_b: np.ndarray, m: int,
           out: np.ndarray, log_a: np.ndarray | None = None) -> np.ndarray:
    """Level index k ∈ [0, m] of magnitudes ``a`` (float32), into ``out``; ``log_a`` is
    ``np.log(a)`` when the caller has it already."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if log_a is None:
            np.log(a, out=out)
        else:
            np.copyto(out, log_a)
        out -= log_r
        out /= log_b
        out += m
        np.rint(out, out=out)
    np.clip(out, 1, m, out=out)
    # Below the smallest level s = r·β^(1−m): zero when |x| < s/2.
    small = np.exp(log_r - (m - 1) * log_b).astype(np.float32) * np.float32(0.5)
    out[a < small] = 0
    return out


class Log(Compander):
    name = "log"
    id = 4
    summary = "logarithmic levels with an exact zero: constant relative error over a wide range"
    params = (
        Param("beta", "<f4", True, "ratio β > 1 between neighbouring levels"),
        Param("max_abs", "<f4", True, "largest level r"),
    )
    options = {
        "beta": "level ratio β > 1 (scalar or per channel); default fitted to the data",
        "max_abs": "largest level r (scalar or per channel); default max|x|",
        "signed": "sign-carrying variant; default: unsigned when the data is non-negative",
    }

    def fit_extra(self, x: np.ndarray, axis: int | None, bits: int, signed: bool,
                  max_abs: np.ndarray, opts: dict[str, Any]) -> Params:
        c = channels(x, axis)
        if opts.get("beta") is not None:
            return {"beta": as_param(opts["beta"], "beta", np.float32, axis, c)}
        m = _magnitudes(bits, signed)
        r = np.asarray(max_abs, np.float64).reshape(-1, 1)
        if m < 2 or x.size == 0 or not np.all(np.isfinite(r) & (r > 0)):  # bad r: check() refuses
            return {"beta": np.full(max_abs.shape, 2.0, np.float32)}
        sample = _sample(x, axis, c)  # (C, S) of |x|, NaN where zero or padding
        step = max(1, _FIT_BLOCK // sample.shape[1])  # channels are fitted independently
        best = np.concatenate([_fit_rows(sample[i:i + step], r[i:i + step], m)
                               for i in range(0, c, step)])
        beta32 = best.astype(np.float32)
        return {"beta": beta32.reshape(()) if axis is None else beta32}

    def check(self, params: Params, bits: int, signed: bool) -> None:
        super().check(params, bits, signed)
        if np.any(params["beta"] <= 1.0):
            raise ValueError("beta must be > 1")

    def _quantize_direct(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                         params: Params, out: np.ndarray | None = None) -> np.ndarray:
        """Codes element by element (block by block): the reference; Compander.quantize
        takes steps or a table of it for large inputs."""
        m = _magnitudes(bits, signed)
        if out is None:
            out = np.empty(x.shape, np.int8 if signed else np.uint8)
        xf, of = x.reshape(-1), out.reshape(-1)
        a_buf = np.empty(min(x.size, CHUNK), np.float32)
        k_buf = np.empty_like(a_buf)
        log_r = np.log(params["max_abs"].astype(np.float64))
        log_b = np.log(params["beta"].astype(np.float64))
        for start, stop, rows, cols, ch in iter_blocks(x.shape, axis if log_r.ndim else None):
            xb = xf[start:stop].reshape(rows, cols)
            a = a_buf[: stop - start].reshape(rows, cols)
            np.abs(xb, out=a)
            k = _index(a, pick(log_r, ch), pick(log_b, ch), m,
                       k_buf[: stop - start].reshape(rows, cols))
            np.copysign(k, xb, out=k)
            if not signed:
                np.maximum(k, 0, out=k)  # unsigned codes: x < 0 saturates to 0, not to |x|
            of[start:stop].reshape(rows, cols)[...] = k
        return out

    def step_estimates(self, bits: int, signed: bool, cols: dict[str, np.ndarray]
                       ) -> np.ndarray:
        """Where the codes step up (see Compander): at s/2, then at the geometric midpoints
        r·β^(j + 1/2 − m) between levels j and j + 1."""
        m = _magnitudes(bits, signed)
        r, b = cols["max_abs"], cols["beta"]
        j = np.arange(1, m, dtype=np.float64)
        pos = np.concatenate([r * b ** (1.0 - m) / 2, r * b ** (j + 0.5 - m)], axis=1)
        return np.concatenate([-pos[:, ::-1], pos], axis=1) if signed else pos

    def levels(self, k: np.ndarray, bits: int, signed: bool,
               cols: dict[str, np.ndarray], unit: np.ndarray | None = None) -> np.ndarray:
        """Decoded value (float32) of table indices ``k``; signed codes are centred on N/2.
        (Not separable: β is per channel, so there is never a ``unit``.)"""
        n = 1 << bits
        m = _magnitudes(bits, signed)
        q = k - (n // 2 if signed else 0)
        mag = np.clip(np.abs(q), 0, m)
        r, b = cols["max_abs"], cols["beta"]
        with np.errstate(over="ignore", under="ignore"):
            vals = np.where(mag > 0, r * b ** (mag - m), 0.0)
        vals = np.where(mag == m, r, vals)  # r exactly
        return (np.sign(q) * vals).astype(np.float32)


_FIT_BLOCK = 1 << 16  # sample values per block of channels: bounds the fit's scratch


def _fit_rows(sample: np.ndarray, r: np.ndarray, m: int) -> np.ndarray:
    """β of each row of ``sample`` (|x| of one channel, NaN where zero), range ``r``
    (rows, 1): of the trials that put the smallest level at a low quantile, the one with
    the least squared error."""
    c = sample.shape[0]
    best_err = np.full(c, np.inf)
    best = np.full(c, 2.0)
    qs = _nan_percentiles(sample, _QUANTILES)  # (Q, C)
    values = np.nan_to_num(sample)
    values32 = values.astype(np.float32)
    with np.errstate(divide="ignore"):
        log_values = np.log(values32)  # once, not per trial
    k = np.empty(sample.shape, np.float32)
    rows = np.arange(c)[:, None]
    steps = np.arange(m + 1, dtype=np.float64)
    for q in qs:
        low = np.where(np.isfinite(q) & (q > 0) & (q < r[:, 0]), q, r[:, 0] / 2**12)
        # β above float32's largest would not survive the stream (data spanning its range)
        with np.errstate(over="ignore"):
            beta = np.clip((r[:, 0] / low) ** (1.0 / (m - 1)), 1.0 + 2.0**-16, _F32_MAX)
        lr, lb = np.log(r), np.log(beta)[:, None]
        k_idx = _index(values32, lr, lb, m, k, log_values).astype(np.intp)
        # The m+1 decoded levels of each channel, then one per element: the same float64
        # expression as per element, evaluated (exp: ~10 ns) m+1 times a channel.
        levels = np.where(steps > 0, np.exp(lr + (steps - m) * lb), 0.0)  # (C, m+1)
        rec = levels[rows, k_idx]
        np.subtract(values, rec, out=rec)
        np.square(rec, out=rec)
        err = np.sum(rec, axis=1)  # no NaN: values and rec are finite
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, beta, best)
    return best


def _nan_percentiles(rows: np.ndarray, percents: tuple[float, ...]) -> np.ndarray:
    """``np.nanpercentile(rows, percents, axis=1)`` (linear interpolation), the same values
    bit for bit, for all rows at once: numpy's own call runs a Python loop per row, ~0.1 ms
    each, which made a per-channel fit of a small tensor take tens of ms. NaN for a row with
    no values."""
    q = np.true_divide(np.asarray(percents, np.float64), 100)[:, None]  # (Q, 1)
    srt = np.sort(rows, axis=1)  # NaN sorts last
    n = np.sum(~np.isnan(rows), axis=1)  # (C,)
    vi = (n - 1) * q  # numpy's virtual index for 'linear', (Q, C)
    prev = np.floor(vi)
    nxt = prev + 1
    top = vi >= n - 1  # at or past the last value: the last value
    prev[top] = nxt[top] = (np.broadcast_to(n - 1, vi.shape))[top]
    low = vi < 0
    prev[low] = nxt[low] = 0
    gamma = vi - np.floor(vi)
    idx = np.arange(rows.shape[0])
    last = max(rows.shape[1] - 1, 0)
    a = srt[idx, np.clip(prev, 0, last).astype(np.intp)]
    b = srt[idx, np.clip(nxt, 0, last).astype(np.intp)]
    with np.errstate(invalid="ignore"):
        diff = b - a
        out = a + diff * gamma
        np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    out[:, n == 0] = np.nan
    return out


def _sample(x: np.ndarray, axis: int | None, c: int) -> np.ndarray:
    """A deterministic strided sample of |x| per channel, (C, S), NaN for zeros."""
    rows = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(c, -1)
    step = max(1, rows.shape[1] // _SAMPLE)
    s = np.abs(rows[:, ::step]).astype(np.float64)
    s[s == 0] = np.nan
    return s
