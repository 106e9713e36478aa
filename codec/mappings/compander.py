"""Shared machinery of the companding mappings (μ-law, exponential).

A compander squeezes |x| ∈ [0, r] onto c ∈ [0, 1] with a monotone curve,
then the uniform quantizer runs on c: unsigned data uses N levels on [0, 1]
(0 exact), signed data N levels on [-1, 1] (ĉ_k = 2k/(N-1) - 1, the
torchaudio μ-law grid, which has no level at 0). Decoding is a lookup
table of the N decoded levels per channel: exact at ±r and much cheaper
than evaluating the inverse curve per element.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Mapping, Params, as_param, channels, has_negative, min_max
from .blocks import CHUNK, iter_blocks, pick


class Compander(Mapping):
    linear = False
    # Fitted range r of an all-zero channel. The signed grid has no level at 0, so
    # mappings using it take the smallest float32 r: the levels next to 0 are then
    # below smallest_subnormal/2 and decode to exactly 0, so a dead channel stays 0.
    zero_range: float = 1.0

    def compress(self, a: np.ndarray, p: dict[str, np.ndarray]) -> None:
        """In place: |x| (float32) → c, for block parameters ``p``."""
        raise NotImplementedError

    def expand(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """c ∈ [0, 1] (float64) → |x̂|, for per-channel columns ``p``."""
        raise NotImplementedError

    def fit_extra(self, x: np.ndarray, axis: int | None, bits: int, signed: bool,
                  max_abs: np.ndarray, opts: dict[str, Any]) -> Params:
        return {}

    def fit(self, x: np.ndarray, bits: int, axis: int | None, signed: bool | None,
            opts: dict[str, Any]) -> tuple[bool, Params]:
        c = channels(x, axis)
        dmin = None
        if opts.get("max_abs") is not None:
            max_abs = as_param(opts["max_abs"], "max_abs", np.float32, axis, c)
        else:
            dmin, dmax = min_max(x, axis)
            amax = np.maximum(np.abs(dmin), np.abs(dmax))
            max_abs = np.where(amax > 0, amax, self.zero_range).astype(np.float32)
        if signed is None:
            signed = has_negative(x) if dmin is None else bool(np.any(dmin < 0))
        params = {"max_abs": max_abs}
        params.update(self.fit_extra(x, axis, bits, signed, max_abs, opts))
        return signed, {p.name: params[p.name] for p in self.params}

    def check(self, params: Params, bits: int, signed: bool) -> None:
        super().check(params, bits, signed)
        if np.any(params["max_abs"] <= 0):
            raise ValueError("max_abs must be > 0")

    def quantize(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                 params: Params, restricted: bool = False) -> np.ndarray:
        top = (1 << bits) - 1
        half = 1 << (bits - 1)
        out = np.empty(x.shape, np.int8 if signed else np.uint8)
        xf, of = x.reshape(-1), out.reshape(-1)
        buf = np.empty(min(x.size, CHUNK), np.float32)
        per_channel = axis is not None and any(v.ndim for v in params.values())
        for start, stop, rows, cols, ch in iter_blocks(x.shape, axis if per_channel else None):
            xb = xf[start:stop].reshape(rows, cols)
            t = buf[: stop - start].reshape(rows, cols)
            np.abs(xb, out=t)
            with np.errstate(over="ignore"):  # |x| >> r overflows to inf: saturates below
                self.compress(t, {k: pick(v, ch) for k, v in params.items()})
            np.clip(t, 0.0, 1.0, out=t)  # |x| > r saturates; also catches +inf
            np.copysign(t, xb, out=t)
            if signed:
                # k = rint((c + 1)(N-1)/2), stored centred as k - N/2.
                t += 1.0
                t *= np.float32(top / 2)
                np.rint(t, out=t)
                t -= half
            else:
                np.maximum(t, 0.0, out=t)  # unsigned codes: x < 0 saturates to 0, not to |x|
                t *= np.float32(top)
                np.rint(t, out=t)
            of[start:stop].reshape(rows, cols)[...] = t
        return out

    def table(self, bits: int, signed: bool, params: Params) -> np.ndarray:
        """Decoded value of every code, shape (channels, N), float32."""
        top = (1 << bits) - 1
        k = np.arange(top + 1, dtype=np.float64)
        chat = 2.0 * k / top - 1.0 if signed else k / top
        cols = {n: np.asarray(v, np.float64).reshape(-1, 1) for n, v in params.items()}
        mag = np.abs(chat)
        with np.errstate(all="ignore"):
            vals = self.expand(np.broadcast_to(mag, (max(v.size for v in params.values()),
                                                     mag.size)), cols)
        vals = np.where(mag >= 1.0, cols["max_abs"], vals)  # ±r exactly
        vals = np.where(mag == 0.0, 0.0, vals)
        return (np.sign(chat) * vals).astype(np.float32)

    def dequantize(self, codes: np.ndarray, bits: int, axis: int | None, signed: bool,
                   params: Params) -> np.ndarray:
        lut = self.table(bits, signed, params)
        idx = codes.view(np.uint8)
        if signed:  # centred codes back to table indices 0..N-1
            idx = (idx + np.uint8(1 << (bits - 1))) if bits < 8 else idx ^ np.uint8(0x80)
            idx &= np.uint8((1 << bits) - 1)
        out = np.empty(codes.shape, np.float32)
        if lut.shape[0] == 1:
            np.take(lut[0], idx, out=out)
            return out
        of, ix = out.reshape(-1), idx.reshape(-1)
        flat = lut.reshape(-1)
        n_levels = lut.shape[1]
        for start, stop, rows, cols, ch in iter_blocks(codes.shape, axis):
            base = (ch * n_levels)[:, None] if ch is not None else 0
            np.take(flat, ix[start:stop].reshape(rows, cols) + base,
                    out=of[start:stop].reshape(rows, cols))
        return out
