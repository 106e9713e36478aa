"""Exact codes of a monotone quantizer by counting its steps, one row of steps per channel.

A b-bit quantizer is a non-decreasing step function of the float32 input with at most
2**b − 1 steps. Once the value where each step lies is known (its threshold), a code
is the code at −inf plus the number of thresholds at or below x: a compare per step on
a cached block, instead of a transcendental function per element. The thresholds are
searched for over float32 values with the quantizer itself, so the counts reproduce it
exactly as long as it is monotone; :meth:`Steps.build` checks that at every step, its
neighbours, the signed zeros and the ends, and returns None otherwise.

Unlike a :class:`~.blocks.CodeTable` (65536 buckets, ~5 ms to build), a row of steps
is 2**b − 1 values found in a handful of vectorized calls of the quantizer (fewer from
a close guess), so every channel gets its own and a per-tensor quantizer whose
parameters are new costs ~1 ms to set up. Counting pays per step, so it is for few bits
(:data:`STEPS_MAX_BITS`), where it is also faster per element than a table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .blocks import CHUNK, _ordered, _unordered, iter_blocks, pick

STEPS_MAX_BITS = 4
_FLAGS_BYTES = 1 << 20  # a block's flags, one byte per element and step: about L2
# A call of the quantizer costs about as much as coding this many elements more.
_CALL_COST = 3000
_LO_KEY = int(_ordered(np.array([0xFF800000], np.uint32))[0])  # -inf
_HI_KEY = int(_ordered(np.array([0x7F800000], np.uint32))[0])  # +inf


def _split(n: int) -> int:
    """Points per search interval (a power of two, 2 to 256) for ``n`` steps at once: about
    as many evaluations per call of the quantizer as the call itself costs."""
    k = 2
    while k < 256 and n * (k - 1) < _CALL_COST:
        k *= 2
    return k


_GUESS_WIDTHS = np.array([1 << 3, 1 << 7, 1 << 12, 1 << 18], np.uint64)  # in float32 values


def _near(f: Callable[[np.ndarray], np.ndarray], j: np.ndarray, guess: np.ndarray,
          lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The narrowest bracket around ``guess``, of a few widths tried in one call of ``f``,
    that holds each step: ``f(lo) < j <= f(hi)``; (lo, hi) unchanged where none does."""
    with np.errstate(all="ignore"):
        g = guess.astype(np.float32)
    key = np.clip(_ordered(g.view(np.uint32)), _LO_KEY + _GUESS_WIDTHS[-1],
                  _HI_KEY - _GUESS_WIDTHS[-1])  # NaN: past +inf, clipped: fails below
    ends = np.concatenate([key[..., None] - _GUESS_WIDTHS, key[..., None] + _GUESS_WIDTHS],
                          axis=-1)  # (rows, steps, 2 · widths)
    codes = f(_unordered(ends).reshape(j.shape[0], -1)).astype(np.int64).reshape(ends.shape)
    n = _GUESS_WIDTHS.size
    holds = (codes[..., :n] < j[..., None]) & (codes[..., n:] >= j[..., None])
    for w in range(n - 1, -1, -1):  # the narrowest last
        lo = np.where(holds[..., w], ends[..., w], lo)
        hi = np.where(holds[..., w], ends[..., n + w], hi)
    return lo, hi


def build_cost(rows: int, n_steps: int) -> int:
    """What :meth:`Steps.build` costs, in elements coded directly."""
    k = _split(rows * n_steps)
    rounds = -(-10 // (k.bit_length() - 1)) + 3  # near a good guess; ends, guess, check
    return rounds * (_CALL_COST + rows * n_steps * (k - 1))


class Steps:
    """Per-row thresholds of a quantizer: row i holds channel i's steps."""

    def __init__(self, base: np.ndarray, thr: np.ndarray) -> None:
        self.base = base  # (rows,) codes at -inf, the output dtype
        self.thr = thr  # (steps, rows) float32, ascending down a column; NaN: no step

    @classmethod
    def build(cls, f: Callable[[np.ndarray], np.ndarray], rows: int, out_dtype: np.dtype,
              guess: np.ndarray | None = None) -> Steps | None:
        """The steps of ``f`` (float32 (rows, m) → integer codes, row i under channel i's
        parameters, monotone along a row), or None. ``guess``, (rows, steps), is about
        where each row's codes step up, ascending: where it brackets a step closely, the
        search starts there (it is checked, so a poor guess costs time only)."""
        ends = f(np.tile(np.array([-np.inf, np.inf], np.float32), (rows, 1))).astype(np.int64)
        c0, c1 = ends[:, 0], ends[:, 1]
        info = np.iinfo(out_dtype)
        if np.any(c1 < c0) or c0.min() < info.min or c1.max() > info.max:
            return None
        n_steps = int((c1 - c0).max())
        j = c0[:, None] + 1 + np.arange(n_steps)  # (rows, steps): code each step reaches
        lo = np.full(j.shape, _LO_KEY, np.uint64)  # f(lo) < j
        hi = np.full(j.shape, _HI_KEY, np.uint64)  # f(hi) >= j (where a step exists)
        if guess is not None and guess.shape == j.shape:
            lo, hi = _near(f, j, guess, lo, hi)
        k = _split(rows * n_steps)
        shift = np.uint64(k.bit_length() - 1)
        frac = np.arange(1, k, dtype=np.uint64)  # k - 1 points split each interval in k
        with np.errstate(all="ignore"):
            while np.any(hi - lo > 1):
                w = hi - lo
                pts = lo[..., None] + (w[..., None] * frac >> shift)
                codes = f(_unordered(pts).reshape(rows, -1)).astype(np.int64)
                # f is monotone: the points below j come first; pts[i] = lo + w·(i+1)//k
                below = np.sum(codes.reshape(pts.shape) < j[..., None], axis=-1,
                               dtype=np.uint64)
                hi = lo + (w * (below + np.uint64(1)) >> shift)
                lo = lo + (w * below >> shift)
        thr = _unordered(hi)  # smallest value with f >= j
        thr[j > c1[:, None]] = np.nan  # no such step in this row: never counted
        steps = cls(c0.astype(out_dtype), np.ascontiguousarray(thr.T))
        # Check: every step, its neighbours, the zeros and the ends.
        probe_keys = np.concatenate([hi, hi - np.uint64(1), hi + np.uint64(1)], axis=1)
        probe = _unordered(np.clip(probe_keys, _LO_KEY, _HI_KEY))
        probe = np.concatenate(
            [probe, np.tile(np.array([-np.inf, -0.0, 0.0, np.inf], np.float32), (rows, 1))],
            axis=1)
        with np.errstate(all="ignore"):
            if not np.array_equal(steps.apply(probe, 0), f(probe).astype(out_dtype)):
                return None
        return steps

    def apply(self, x: np.ndarray, axis: int | None, out: np.ndarray | None = None
              ) -> np.ndarray:
        """Codes of C-contiguous float32 ``x``: the steps of channel i along ``axis`` code
        that channel (one row of steps and ``axis`` None: the whole tensor).

        Each block is compared with every step in one call, into a (steps, block) array
        of flags, which one reduction sums: two calls a block, not two a step."""
        if out is None:
            out = np.empty(x.shape, self.base.dtype)
        xf, of = x.reshape(-1), out.reshape(-1)
        n = self.thr.shape[0]
        chunk = min(CHUNK, max(1, _FLAGS_BYTES // max(n, 1)))
        flags = np.empty((n, min(x.size, chunk)), np.uint8)
        base = self.base.view(np.uint8)  # int8 codes add like their bytes
        for start, stop, rows, cols, ch in iter_blocks(x.shape, axis, chunk):
            xb = xf[start:stop].reshape(rows, cols)
            ob = of[start:stop].reshape(rows, cols).view(np.uint8)
            g = flags[:, : stop - start].reshape(n, rows, cols)
            np.greater_equal(xb, self.thr[:, [0] if ch is None else ch, None],
                             out=g.view(np.bool_))
            np.add.reduce(g, axis=0, out=ob)
            np.add(ob, pick(base, ch), out=ob)
        return out
