"""Shared machinery of the companding mappings (μ-law, exponential).

A compander squeezes |x| ∈ [0, r] onto c ∈ [0, 1] with a monotone curve,
then the uniform quantizer runs on c: unsigned data uses N levels on [0, 1]
(0 exact), signed data N levels on [-1, 1] (ĉ_k = 2k/(N-1) - 1, the
torchaudio μ-law grid, which has no level at 0). Decoding is a lookup
table of the N decoded levels per channel: exact at ±r and much cheaper
than evaluating the inverse curve per element.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .base import Mapping, Params, as_param, channels, has_negative, min_max
from .blocks import CHUNK, LUT_MIN_SIZE, CodeTable, iter_blocks, pick
from .steps import STEPS_MAX_BITS, Steps, build_cost


# Recently built code tables (~0.8 MiB each: codes, thresholds, two entry tables) and
# per-tensor steps (a few values), keyed by method, bits, sign and parameters.
_TABLES: dict[tuple[Any, ...], CodeTable | Steps | None] = {}
_TABLES_MAX = 8
# Elements coded directly so far under the key of a shared table not built yet: it is built
# once they pass LUT_MIN_SIZE, about what building costs (see Compander.input_scale).
_PENDING: dict[tuple[Any, ...], int] = {}
_TABLES_LOCK = threading.Lock()
# Elements a call must code per element's worth of work that finding their steps costs
# (coding directly costs about ten times counting: steps pay once the build is no more).
_STEPS_MIN_RATIO = 1
_SMALL_TABLE = 4096  # entries: a table this small is always cheaper than direct decoding


def _recall(key: tuple[Any, ...]) -> Any:
    """A cached table or steps (the caller holds the lock and knows the key is there)."""
    _TABLES[key] = value = _TABLES.pop(key)  # most recently used last
    return value


def _remember(key: tuple[Any, ...], value: CodeTable | Steps | None) -> None:
    with _TABLES_LOCK:
        _TABLES[key] = value
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.pop(next(iter(_TABLES)))


class Compander(Mapping):
    linear = False
    # Fitted range r of an all-zero channel. The signed grid has no level at 0, so
    # mappings using it take the smallest float32 r: the levels next to 0 are then
    # below smallest_subnormal/2 and decode to exactly 0, so a dead channel stays 0.
    zero_range: float = 1.0

    def compress(self, a: np.ndarray, p: dict[str, np.ndarray]) -> None:
        """In place: |x| (float32) → c, for block parameters ``p``."""
        raise NotImplementedError

    def input_scale(self, params: Params) -> tuple[np.ndarray, Params] | None:
        """``(k, shared)`` when :meth:`compress` under ``params`` first multiplies |x| by a
        float32 factor ``k`` (per tensor, or one per channel) and then depends only on the
        channel-free parameters ``shared``, under which that factor is exactly 1: the codes
        are then one monotone function of the product x·k, whatever the channel, and one
        code table (built once for ``shared``) codes every tensor and channel. None when
        not (the default)."""
        return None

    def expand(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """c ∈ [0, 1] (float64) → |x̂|, for per-channel columns ``p``."""
        raise NotImplementedError

    # A mapping whose expand is expand_scaled(expand_unit(c)) with expand_unit free of
    # per-channel parameters evaluates its transcendental part once per code, not once
    # per element, when it decodes element by element.
    separable = False

    def expand_unit(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """The part of :meth:`expand` that depends on c and channel-free parameters only."""
        raise NotImplementedError

    def expand_scaled(self, u: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`expand` from :meth:`expand_unit`'s values and the per-channel columns."""
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
                 params: Params, restricted: bool = False, out: np.ndarray | None = None,
                 x_range: tuple[float, float] | None = None) -> np.ndarray:
        """Codes of C-contiguous float32 ``x``.

        The codes of each channel are one monotone step function of the input, so
        tensors large enough to pay for it are coded from those steps, found with
        :meth:`_quantize_direct` itself (identical codes, no transcendental function
        per element): at up to STEPS_MAX_BITS by counting them (:class:`~.steps.Steps`,
        per channel), above through a per-tensor :class:`~.blocks.CodeTable`. A
        mapping whose codes depend on each channel's parameters only through a factor
        on the input (:meth:`input_scale`) codes per-channel tensors, and per-tensor
        ones below a table's size, through one table of the product, shared by every
        call; otherwise :meth:`_quantize_direct` runs block by block.
        """
        out_dtype = np.dtype(np.int8 if signed else np.uint8)
        per_channel = axis is not None and any(np.ndim(v) for v in params.values())
        if x.dtype != np.float32:
            return self._quantize_direct(x, bits, axis, signed, params, out)
        nonneg = x_range is not None and x_range[0] >= 0  # -0.0 counts as 0
        scaled = self.input_scale(params)
        # At few bits, counting steps codes about as fast as a table and costs far less to
        # set up (~1 ms, not ~5): no table of its own there.
        count = bits <= STEPS_MAX_BITS and not (per_channel and scaled is not None)
        if not count and not per_channel and x.size >= LUT_MIN_SIZE:  # no product pass
            table = self._table_for(bits, signed, params, out_dtype)
            if table is not None:
                return table.quantize(x, out_dtype, out, nonneg)
        if count:
            steps = self._steps_for(x, bits, axis if per_channel else None, signed, params,
                                    out_dtype)
            if steps is not None:
                return steps.apply(x, axis if per_channel else None, out)
        if scaled is not None:
            table = self._table_for(bits, signed, scaled[1], out_dtype, work=x.size)
            if table is not None:
                return table.quantize(x, out_dtype, out, nonneg, scale=scaled[0],
                                      axis=axis if per_channel else None)
        return self._quantize_direct(x, bits, axis, signed, params, out)

    def _steps_for(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                   params: Params, out_dtype: np.dtype) -> Steps | None:
        """The steps of every channel along ``axis`` (of the tensor: None), when ``x`` has
        enough elements to pay for finding them, else None."""
        rows = 1 if axis is None else x.shape[axis]
        if not x.size or x.size < _STEPS_MIN_RATIO * build_cost(rows, (1 << bits) - 1):
            return None
        key = None
        if axis is None:  # the same steps serve every segment of the tensor
            key = self._key(bits, signed, params) + ("steps",)
            with _TABLES_LOCK:
                if key in _TABLES:
                    return _recall(key)
        cols = {k: np.broadcast_to(np.reshape(v, -1), (rows,)) for k, v in params.items()}
        with np.errstate(all="ignore"):
            guess = self.step_estimates(
                bits, signed, {k: np.asarray(v, np.float64)[:, None] for k, v in cols.items()})
        steps = Steps.build(lambda v: self._quantize_direct(v, bits, 0, signed, cols),
                            rows, out_dtype, guess)
        if key is not None:
            _remember(key, steps)
        return steps

    def step_estimates(self, bits: int, signed: bool, cols: dict[str, np.ndarray]
                       ) -> np.ndarray:
        """About where the codes step up, ascending, (rows, steps) float64, for per-channel
        columns ``cols``: the inverse curve at the midpoints between the levels (a guess
        that :meth:`Steps.build` checks)."""
        top = (1 << bits) - 1
        k = np.arange(top, dtype=np.float64)
        c = (2 * k + 1) / top - 1 if signed else (k + 0.5) / top
        # The signed grid's middle step is where float32 c + 1 falls below 1 (a tie at 1
        # rounds to the upper code), not at c = 0: far from 0 in float32 values.
        c[c == 0] = -2.0**-25
        return np.sign(c) * self.expand(np.abs(c)[None, :], cols)

    def _key(self, bits: int, signed: bool, params: Params) -> tuple[Any, ...]:
        """Cache key of a table or steps: method, bits, sign and per-tensor parameters."""
        return (self.name, bits, signed, tuple((k, np.asarray(v).dtype.str,
                                                np.asarray(v).tobytes())
                                               for k, v in sorted(params.items())))

    def _table_for(self, bits: int, signed: bool, params: Params, out_dtype: np.dtype,
                   work: int | None = None) -> CodeTable | None:
        """The code table of per-tensor ``params``, from a small cache (given parameters
        repeat across calls) or built (a few ms). With ``work``, the elements about to be
        coded, a table not cached yet is built only once the work asked of it adds up to
        LUT_MIN_SIZE elements (None before), so a single small call does not pay for it."""
        flat = {k: np.asarray(v).reshape(()) for k, v in params.items()}
        key = self._key(bits, signed, flat)
        with _TABLES_LOCK:
            if key in _TABLES:
                return _recall(key)
            if work is not None:
                seen = _PENDING.pop(key, 0) + work
                if seen < LUT_MIN_SIZE:
                    _PENDING[key] = seen  # most recent last
                    while len(_PENDING) > _TABLES_MAX:
                        _PENDING.pop(next(iter(_PENDING)))
                    return None
        table = CodeTable.build(
            lambda v: self._quantize_direct(v, bits, None, signed, flat), out_dtype)
        _remember(key, table)
        return table

    def _quantize_direct(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                         params: Params, out: np.ndarray | None = None) -> np.ndarray:
        """The codes computed element by element (block by block): the reference."""
        top = (1 << bits) - 1
        half = 1 << (bits - 1)
        if out is None:
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

    def levels(self, k: np.ndarray, bits: int, signed: bool,
               cols: dict[str, np.ndarray], unit: np.ndarray | None = None) -> np.ndarray:
        """Decoded value (float32) of table indices ``k`` with parameters ``cols``
        broadcast against them; the one formula behind tables and direct decoding.
        ``unit`` is :meth:`expand_unit` of every index's c, for a separable mapping."""
        top = (1 << bits) - 1
        chat = 2.0 * k / top - 1.0 if signed else k / top
        mag = np.abs(chat)
        with np.errstate(all="ignore"):
            vals = self.expand(mag, cols) if unit is None else \
                self.expand_scaled(unit[k.astype(np.intp)], cols)
        vals = np.where(mag >= 1.0, cols["max_abs"], vals)  # ±r exactly
        vals = np.where(mag == 0.0, 0.0, vals)
        return (np.sign(chat) * vals).astype(np.float32)

    def table(self, bits: int, signed: bool, params: Params) -> np.ndarray:
        """Decoded value of every code, shape (channels, N), float32."""
        cols = {n: np.asarray(v, np.float64).reshape(-1, 1) for n, v in params.items()}
        return self.levels(np.arange(1 << bits, dtype=np.float64)[None, :], bits, signed, cols)

    def dequantize(self, codes: np.ndarray, bits: int, axis: int | None, signed: bool,
                   params: Params, out: np.ndarray | None = None) -> np.ndarray:
        channels_ = max(np.size(v) for v in params.values())
        # A table costs channels·N values (and ~40 bytes each while it is built): a
        # stream with many channels and few elements each decodes element by element,
        # so decoding never allocates much more than its own output.
        if channels_ << bits <= max(codes.size // 8, _SMALL_TABLE):
            return lookup(self.table(bits, signed, params), codes, bits, signed, axis, out)
        return self._dequantize_direct(codes, bits, axis, signed, params, out)

    def _dequantize_direct(self, codes: np.ndarray, bits: int, axis: int | None,
                           signed: bool, params: Params, out: np.ndarray | None = None
                           ) -> np.ndarray:
        if out is None:
            out = np.empty(codes.shape, np.float32)
        u, of = codes.reshape(-1).view(np.uint8), out.reshape(-1)
        half, mask = 1 << (bits - 1), (1 << bits) - 1
        cols64 = {n: np.asarray(v, np.float64) for n, v in params.items()}
        unit = None
        if self.separable:  # c of every index, exactly as levels forms it
            idx = np.arange(mask + 1, dtype=np.float64)
            mag = np.abs(2.0 * idx / mask - 1.0 if signed else idx / mask)
            with np.errstate(all="ignore"):
                unit = self.expand_unit(mag, cols64)
        for start, stop, rows, cols, ch in iter_blocks(codes.shape, axis):
            k = u[start:stop].reshape(rows, cols)
            if signed:  # wraps modulo 256, of which mask + 1 is a divisor
                k = (k + np.uint8(half)) & np.uint8(mask)
            k = k.astype(np.float64)
            of[start:stop].reshape(rows, cols)[...] = self.levels(
                k, bits, signed, {n: pick(v, ch) for n, v in cols64.items()}, unit)
        return out


def lookup(lut: np.ndarray, codes: np.ndarray, bits: int, signed: bool, axis: int | None,
           out: np.ndarray | None = None) -> np.ndarray:
    """``lut[channel, stored code]`` (float32) for every code, block by block.

    ``np.take`` converts its indices to intp first; a whole-tensor take would
    make an 8-bytes-per-code temporary, so the (stored) codes are widened to
    intp one block at a time into scratch, and ``mode="clip"`` skips the bounds
    check (every index is in range by construction).
    """
    if out is None:
        out = np.empty(codes.shape, np.float32)
    if codes.size == 0:
        return out
    u, of = codes.reshape(-1).view(np.uint8), out.reshape(-1)
    n_levels = lut.shape[1]
    flat = np.ascontiguousarray(lut, np.float32).reshape(-1)
    half = np.intp(1 << (bits - 1))
    mask = np.intp(n_levels - 1)
    idx = np.empty(min(codes.size, CHUNK), np.intp)
    per_channel = lut.shape[0] > 1 and axis is not None
    for start, stop, rows, cols, ch in iter_blocks(codes.shape, axis if per_channel else None):
        ix = idx[: stop - start].reshape(rows, cols)
        np.copyto(ix, u[start:stop].reshape(rows, cols))
        if signed:  # centred codes back to table indices 0..N-1
            np.add(ix, half, out=ix)
            np.bitwise_and(ix, mask, out=ix)
        if ch is not None:
            np.add(ix, (ch * n_levels)[:, None], out=ix)
        np.take(flat, ix, out=of[start:stop].reshape(rows, cols), mode="clip")
    return out
