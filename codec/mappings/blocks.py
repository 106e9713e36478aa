"""Cache-sized blocks of a C-contiguous tensor, each with its channels.

Every data path walks the flat tensor block by block so scratch memory stays
one chunk whatever the tensor size, and every pass after the first over a
block hits the cache instead of memory. A per-channel block is a 2-D
(rows, cols) view whose rows each belong to one channel, so parameters
broadcast as a (rows, 1) column with no Python loop per channel or element.

Chunk sizes trade numpy's per-call overhead (about 1 µs, i.e. the time to
stream ~5 KB from memory) against cache residency: 64 Ki float32 elements
(256 KiB of scratch) keep a block in a 1 MiB L2 while the ~5 calls per block
cost a few percent of the block's memory traffic.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from math import prod
from typing import Any

import numpy as np

CHUNK = 1 << 16  # elements: 256 KiB of float32 scratch stays in L2
# A reduction touches each element once from memory; the second one reads the cache.
_REDUCE_CHUNK = 1 << 17


def iter_blocks(shape: tuple[int, ...], axis: int | None, chunk: int | None = None
                ) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
    """Yield (start, stop, rows, cols, channel_of_each_row or None)."""
    chunk = CHUNK if chunk is None else chunk
    n = prod(shape)
    if n == 0:
        return
    if axis is None:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            yield start, stop, 1, stop - start, None
        return
    c = shape[axis]
    post = prod(shape[axis + 1:])
    nrows = n // post
    if post >= chunk:
        for r in range(nrows):
            ch = np.array([r % c])
            for s in range(0, post, chunk):
                e = min(s + chunk, post)
                yield r * post + s, r * post + e, 1, e - s, ch
    else:
        k = max(1, chunk // post)
        for r0 in range(0, nrows, k):
            r1 = min(r0 + k, nrows)
            yield r0 * post, r1 * post, r1 - r0, post, np.arange(r0, r1) % c


def pick(param: np.ndarray, ch: np.ndarray | None) -> np.ndarray:
    """The parameter for a block: a scalar, or a (rows, 1) column."""
    if ch is None or param.ndim == 0:
        return param.reshape(())
    if ch.size == 1:  # one row (long channels): a scalar keeps numpy's fast scalar loops
        return param.reshape(-1)[ch[0]]
    return param.reshape(-1)[ch][:, None]


def _abs_row_sums(block: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """float64 sums of |block| along its rows (2-D), through the scratch ``buf``: the one
    summation behind :func:`mean_abs`, so the fused input check gives the same bits."""
    a = buf[: block.size].reshape(block.shape)
    np.abs(block, out=a)
    return a.sum(axis=1, dtype=np.float64)


def mean_abs(x: np.ndarray, axis: int | None) -> np.ndarray:
    """mean(|x|) per tensor (0-d) or per channel (1-D), in float64, without a full temporary.
    A per-tensor sum noted by :func:`checked_range` for this very array is used once
    instead of scanning again."""
    if axis is None and x.size:
        noted = _take_noted(x, "abs_sum")
        if noted is not None:
            return np.asarray(noted / x.size, np.float64)
    c = 1 if axis is None else x.shape[axis]
    sums = np.zeros(c)
    counts = np.zeros(c)
    xf = x.reshape(-1)
    buf = np.empty(min(x.size, CHUNK), x.dtype)
    for start, stop, rows, cols, ch in iter_blocks(x.shape, axis):
        rs = _abs_row_sums(xf[start:stop].reshape(rows, cols), buf)
        if ch is None:
            sums[0] += rs[0]
            counts[0] += cols
        else:
            sums += np.bincount(ch, weights=rs, minlength=c)
            counts += np.bincount(ch, minlength=c) * cols
    mean = np.divide(sums, counts, out=np.zeros(c), where=counts > 0)
    return mean.reshape(()) if axis is None else mean


# --------------------------------------------------------------------------- min and max


def _flat_min_max(xf: np.ndarray) -> tuple[np.floating, np.floating]:
    """Min and max of a non-empty 1-D array in one pass over memory: both
    reductions run on a block while it is in cache. NaN propagates."""
    step = _REDUCE_CHUNK
    if xf.size <= step:
        return np.minimum.reduce(xf), np.maximum.reduce(xf)
    mins = []
    maxs = []
    for start in range(0, xf.size, step):
        block = xf[start: start + step]
        mins.append(np.minimum.reduce(block))
        maxs.append(np.maximum.reduce(block))
    return np.minimum.reduce(np.array(mins)), np.maximum.reduce(np.array(maxs))


def _axis_min_max(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max (1-D, length ``x.shape[axis]``) in one pass over memory."""
    pre, c, post = prod(x.shape[:axis]), x.shape[axis], prod(x.shape[axis + 1:])
    x3 = x.reshape(pre, c, post)
    step = _REDUCE_CHUNK
    if c * post <= step:  # whole pre-slices per block
        k = max(1, step // (c * post))
        mn = mx = None
        for p in range(0, pre, k):
            block = x3[p: p + k]
            bmn, bmx = block.min(axis=(0, 2)), block.max(axis=(0, 2))
            mn = bmn if mn is None else np.minimum(mn, bmn, out=mn)
            mx = bmx if mx is None else np.maximum(mx, bmx, out=mx)
        return mn, mx
    mn = np.empty(c, x.dtype)
    mx = np.empty(c, x.dtype)
    first = True
    if post <= step:  # runs of whole channels of one pre-slice per block
        k = max(1, step // post)
        for p in range(pre):
            for c0 in range(0, c, k):
                block = x3[p, c0: c0 + k]
                bmn, bmx = block.min(axis=1), block.max(axis=1)
                if first:
                    mn[c0: c0 + k], mx[c0: c0 + k] = bmn, bmx
                else:
                    np.minimum(mn[c0: c0 + k], bmn, out=mn[c0: c0 + k])
                    np.maximum(mx[c0: c0 + k], bmx, out=mx[c0: c0 + k])
            first = False
        return mn, mx
    for ch in range(c):  # a channel's run spans several blocks
        lo, hi = zip(*(_flat_min_max(x3[p, ch]) for p in range(pre)))
        mn[ch] = np.minimum.reduce(np.array(lo))
        mx[ch] = np.maximum.reduce(np.array(hi))
    return mn, mx


def min_max(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max per tensor (0-d) or per channel along ``axis`` (1-D), in float64.

    One pass over memory (``np.min`` then ``np.max`` is two); NaN propagates,
    ±inf is returned as such. A result noted by :func:`checked_range` for this
    very array (and axis) is used once instead of scanning again.
    """
    if x.size == 0:
        z = np.zeros(() if axis is None else (x.shape[axis],))
        return z, z.copy()
    noted = _take_noted(x, "range" if axis is None else f"range{axis}")
    if noted is not None:
        return noted
    if axis is None:
        lo, hi = _flat_min_max(np.ascontiguousarray(x).reshape(-1))
        return np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    mn, mx = _axis_min_max(np.ascontiguousarray(x), axis)
    return mn.astype(np.float64), mx.astype(np.float64)


# Statistics computed by the input check (codec.api) for the array about to be fitted,
# so that fitting does not scan the tensor again: its range ("range"), the per-channel
# ranges along an axis for a per-channel fit ("range1" for axis 1) and, for fits that
# need it, the float64 sum of |x| ("abs_sum"). Thread-local, held through
# a weak reference to that very array object (same data pointer, shape and strides);
# each statistic is used at most once, and a note for another array drops them all.
_noted = threading.local()


def note_range(x: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               abs_sum: float | None = None,
               channels: tuple[int, np.ndarray, np.ndarray] | None = None) -> None:
    """Remember the per-tensor (lo, hi) of ``x`` (and the sum of |x|, or the per-channel
    (axis, min, max)) for its fit."""
    try:
        ref = weakref.ref(x)
    except TypeError:
        return
    stats: dict[str, object] = {"range": (np.asarray(lo, np.float64), np.asarray(hi, np.float64))}
    if abs_sum is not None:
        stats["abs_sum"] = abs_sum
    if channels is not None:
        stats[f"range{channels[0]}"] = channels[1:]
    _noted.entry = (ref, x.__array_interface__["data"][0], x.shape, x.strides, stats)


def _take_noted(x: np.ndarray, key: str) -> Any:
    entry = getattr(_noted, "entry", None)
    if entry is None:
        return None
    ref, ptr, shape, strides, stats = entry
    if not (ref() is x and x.__array_interface__["data"][0] == ptr and x.shape == shape
            and x.strides == strides):
        _noted.entry = None
        return None
    value = stats.pop(key, None)
    if not stats:
        _noted.entry = None
    return value


def tensor_min(x: np.ndarray) -> np.ndarray:
    """Per-tensor min of a non-empty array (±inf allowed): the noted range if any, else
    one reduction."""
    noted = _take_noted(x, "range")
    return noted[0] if noted is not None else np.asarray(np.min(x), np.float64)


def _flat_stats(xf: np.ndarray) -> tuple[np.floating, np.floating, float]:
    """Min, max and the float64 sum of |x| of a non-empty 1-D array in one pass over
    memory, the sum block by block exactly as :func:`mean_abs` forms it."""
    buf = np.empty(min(xf.size, CHUNK), xf.dtype)
    mins, maxs = [], []
    total = 0.0
    for start, stop, _, cols, _ in iter_blocks(xf.shape, None):
        block = xf[start:stop]
        mins.append(np.minimum.reduce(block))
        maxs.append(np.maximum.reduce(block))
        total += float(_abs_row_sums(block.reshape(1, cols), buf)[0])
    return np.minimum.reduce(np.array(mins)), np.maximum.reduce(np.array(maxs)), total


def checked_range(x: np.ndarray, abs_sum: bool = False, axis: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (min, max) of a non-empty float array in one pass, noted for the fit
    that follows (see :func:`min_max`), with the sum of |x| for :func:`mean_abs` when
    ``abs_sum``, or, with ``axis``, the per-channel ranges (computed in that same pass;
    the tensor's range is theirs). NaN propagates to both."""
    if axis is not None and not abs_sum:
        mn, mx = (a.astype(np.float64) for a in _axis_min_max(np.ascontiguousarray(x), axis))
        lo, hi = np.min(mn), np.max(mx)  # NaN propagates
        note_range(x, lo, hi, channels=(axis, mn, mx))
        return np.asarray(lo), np.asarray(hi)
    xf = np.ascontiguousarray(x).reshape(-1)
    total = None
    if abs_sum:
        lo, hi, total = _flat_stats(xf)
    else:
        lo, hi = _flat_min_max(xf)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    note_range(x, lo, hi, total)
    return lo, hi


# --------------------------------------------------------------------- lookup-table codes

# Tensors at least this large go through a code table (build: a few ms, ~30 ns/element
# saved: a few hundred thousand elements pay for it).
LUT_MIN_SIZE = 1 << 18
_MAX_THRESHOLDS = 3  # per bucket; more means no table (the direct path)
_F32_BITS = np.dtype("<u4")
# Elements per apply() call: the ~8 numpy calls per block cost more than the L3 traffic
# of a 1 MiB intp index block.
_TABLE_STEP = 1 << 17


def _ordered(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) → uint64 keys in the order of the values (no NaN)."""
    b = bits.astype(np.uint64)
    neg = (b >> np.uint64(31)) == 1
    return np.where(neg, b ^ np.uint64(0xFFFFFFFF), b ^ np.uint64(0x80000000))


def _unordered(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_ordered`: float32 values."""
    k = keys.astype(np.uint64)
    neg = k < np.uint64(0x80000000)
    b = np.where(neg, k ^ np.uint64(0xFFFFFFFF), k ^ np.uint64(0x80000000))
    return b.astype(np.uint32).view(np.float32)


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """intp indices, 4-byte gathered values, and 4 bytes per element of work space."""
    return np.empty(n, np.intp), np.empty(n, np.float32), np.empty(n, np.uint32)


class CodeTable:
    """Exact codes of a monotone per-tensor quantizer by table lookup.

    A mapping's codes are a non-decreasing step function ``F`` of the float32
    input (for fixed parameters), with at most ``2**bits - 1`` steps. The table
    holds, for each of the 65536 buckets of inputs sharing the high 16 bits of
    their float32 pattern (sign, exponent, 7 mantissa bits), the code at the
    bucket's lowest value and the (at most three) step thresholds inside the
    bucket (NaN where none, so that ``x >= NaN`` is false). Then
    ``F(x) = low[b] + sum_k (x >= thr[k][b])``: two or four gathers and a few
    compares per element instead of a transcendental function.

    The thresholds are found by bisection over float32 values with ``F``
    itself, so the table reproduces ``F`` exactly as long as ``F`` is monotone;
    :meth:`build` checks that on every threshold and its neighbours and on the
    signed zeros, and returns None (use ``F`` directly) otherwise.
    """

    def __init__(self, low: np.ndarray, thr: np.ndarray) -> None:
        self.low = low  # (65536,) codes, the output dtype
        self.thr = thr  # (K, 65536) float32
        # With at most one step per bucket, one uint32 gather does it all. Let ``lo`` be
        # the low 16 bits of x's pattern, complemented for negative x, so that it grows
        # with x inside a bucket, and T the same of the bucket's step; with
        # ``e = low * 2**16 + (2**16 - T)`` (just ``low * 2**16`` without a step), the
        # carry out of ``e + lo`` is ``x >= step``: ``code = (e + lo) >> 16``.
        # The kernel adds the whole 32-bit ``y`` (x's pattern, all bits complemented for
        # negative x) instead of ``lo``: y's high half is a constant of the bucket, taken
        # out of its entry modulo 2**32, which saves masking the low half.
        self.entry = self.entry_nonneg = None
        if thr.shape[0] <= 1:
            e = low.view(np.uint8).astype(np.uint32) << np.uint32(16)
            if thr.shape[0]:
                has = ~np.isnan(thr[0])
                tb = thr[0].view(np.uint32)
                neg = (tb >> np.uint32(31)).astype(bool)
                t16 = (tb ^ np.where(neg, np.uint32(0xFFFF), np.uint32(0))) & np.uint32(0xFFFF)
                e[has] += np.uint32(1 << 16) - t16[has]
            h = np.arange(1 << 16, dtype=np.uint32)
            neg_bucket = h >= np.uint32(0x8000)
            self.entry = e - (np.where(neg_bucket, ~h & np.uint32(0xFFFF), h) << np.uint32(16))
            # With no x < 0, y is x's pattern itself. The one negative pattern left is
            # -0.0 (bucket 0x8000, low half 0, complemented 0xFFFF).
            self.entry_nonneg = (e - (h << np.uint32(16))
                                 + np.where(neg_bucket, np.uint32(0xFFFF), np.uint32(0)))

    @classmethod
    def build(cls, f, out_dtype: np.dtype) -> CodeTable | None:
        """The table of ``f`` (float32 array → integer codes, monotone), or None."""
        lo_key = int(_ordered(np.array([0xFF800000], np.uint32))[0])  # -inf
        hi_key = int(_ordered(np.array([0x7F800000], np.uint32))[0])  # +inf
        ends = f(np.array([-np.inf, np.inf], np.float32)).astype(np.int64)
        c0, c1 = int(ends[0]), int(ends[1])
        if c1 < c0:
            return None
        j = np.arange(c0 + 1, c1 + 1, dtype=np.int64)  # code steps to locate
        lo = np.full(j.size, lo_key, np.uint64)  # f(lo) < j
        hi = np.full(j.size, hi_key, np.uint64)  # f(hi) >= j
        with np.errstate(all="ignore"):
            for _ in range(33):
                if not np.any(hi - lo > 1):
                    break
                mid = lo + (hi - lo) // np.uint64(2)
                ge = f(_unordered(mid)).astype(np.int64) >= j
                hi = np.where(ge, mid, hi)
                lo = np.where(ge, lo, mid)
        keys = hi  # smallest key with f >= j, non-decreasing in j
        t = _unordered(keys)
        if j.size and (np.any(np.diff(keys.astype(np.int64)) <= 0)):
            return None  # a jump of two codes at one value: not a table of single steps
        # Buckets in value order: negative patterns 0xFFFF..0x8000, then 0x0000..0x7FFF.
        h_all = np.arange(1 << 16, dtype=np.uint32)
        order = np.concatenate([h_all[::-1][: 1 << 15], h_all[: 1 << 15]])
        pos = np.empty(1 << 16, np.int64)
        pos[order] = np.arange(1 << 16)
        # Lowest key of each bucket: the low pattern for positive, the high one for negative.
        low_pat = np.where(h_all >= 0x8000, (h_all << 16) | 0xFFFF, h_all << 16).astype(np.uint32)
        low_key = _ordered(low_pat)
        tb = (t.view(np.uint32) >> 16).astype(np.int64)  # bucket of each threshold
        inside = keys > low_key[tb]  # else the step is at the bucket's lowest value
        start = pos[tb] + inside  # first bucket (value order) whose low value is past it
        inc = np.zeros((1 << 16) + 1, np.int64)
        np.add.at(inc, start, 1)
        low_in_order = c0 + np.cumsum(inc[: 1 << 16])
        low = np.empty(1 << 16, np.int64)
        low[order] = low_in_order
        # Thresholds strictly inside a bucket, at most K per bucket.
        tb_in, t_in = tb[inside], t[inside]
        counts = np.bincount(tb_in, minlength=1 << 16)
        k_max = int(counts.max()) if counts.size else 0
        if k_max > _MAX_THRESHOLDS:
            return None
        thr = np.full((max(k_max, 0), 1 << 16), np.nan, np.float32)
        if tb_in.size:  # row = rank of a threshold among those of its bucket
            srt = np.argsort(tb_in, kind="stable")
            rank = np.empty(tb_in.size, np.int64)
            rank[srt] = np.arange(tb_in.size) - np.searchsorted(tb_in[srt], tb_in[srt])
            thr[rank, tb_in] = t_in
        info = np.iinfo(out_dtype)
        if c0 < info.min or c1 > info.max:
            return None
        table = cls(low.astype(out_dtype), thr)
        # Check: every step, its neighbours, the zeros and the ends.
        probe_keys = np.concatenate([keys, keys - 1, keys + 1,
                                     np.array([lo_key, hi_key], np.uint64)])
        probe_keys = probe_keys[(probe_keys >= lo_key) & (probe_keys <= hi_key)]
        probe = np.concatenate([_unordered(probe_keys),
                                np.array([-0.0, 0.0], np.float32)])
        with np.errstate(all="ignore"):
            if not np.array_equal(table.apply(probe), f(probe).astype(out_dtype)):
                return None
        return table

    def apply(self, x: np.ndarray, out: np.ndarray | None = None,
              scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              nonneg: bool = False) -> np.ndarray:
        """Codes of float32 ``x`` (1-D, contiguous) into ``out``. ``nonneg`` promises
        that no element is below zero (-0.0 allowed), which saves two passes."""
        n = x.size
        if out is None:
            out = np.empty(n, self.low.dtype)
        if scratch is None:
            scratch = _scratch(n)
        idx, tv, lo = (a[:n] for a in scratch)
        bits = x.view(_F32_BITS)
        np.right_shift(bits, np.uint32(16), out=idx, casting="unsafe")
        if self.entry is not None:
            ent = tv.view(np.uint32)
            if nonneg:
                np.take(self.entry_nonneg, idx, out=ent, mode="clip")  # no bounds check
                np.add(ent, bits, out=ent)
            else:
                np.take(self.entry, idx, out=ent, mode="clip")
                np.right_shift(x.view(np.int32), np.int32(31), out=lo.view(np.int32))  # 0, -1
                np.bitwise_xor(lo, bits, out=lo)  # y
                np.add(ent, lo, out=ent)
            np.right_shift(ent, np.uint32(16), out=out.view(np.uint8), casting="unsafe")
            return out
        ge = lo.view(np.bool_)[:n]
        o8 = out.view(np.uint8)  # int8 codes add like their bytes
        np.take(self.low, idx, out=out, mode="clip")  # mode="clip": no bounds check
        for row in self.thr:  # (strided views of one 8-byte gather were slower)
            np.take(row, idx, out=tv, mode="clip")
            np.greater_equal(x, tv, out=ge)
            np.add(o8, ge.view(np.uint8), out=o8)
        return out

    def quantize(self, x: np.ndarray, out_dtype: np.dtype, out: np.ndarray | None = None,
                 nonneg: bool = False, scale: np.ndarray | None = None,
                 axis: int | None = None) -> np.ndarray:
        """Codes of a whole C-contiguous float32 tensor, block by block (``nonneg``: see
        :meth:`apply`); with ``scale``, of the float32 products x·scale, ``scale`` per
        tensor (0-d) or one per channel along ``axis`` (the products keep the sign of x,
        so ``nonneg`` still holds)."""
        if out is None:
            out = np.empty(x.shape, out_dtype)
        xf, of = x.reshape(-1), out.reshape(-1)
        step = min(xf.size, _TABLE_STEP)
        scratch = _scratch(step)
        buf = None if scale is None else np.empty(step, np.float32)
        per_channel = scale is not None and np.ndim(scale) > 0
        with np.errstate(over="ignore"):  # |x|·scale past FLT_MAX is inf, as in the mapping
            for start, stop, rows, cols, ch in iter_blocks(
                    x.shape, axis if per_channel else None, step):
                xb = xf[start:stop]
                if buf is not None:
                    xb = buf[: stop - start]
                    np.multiply(xf[start:stop].reshape(rows, cols), pick(scale, ch),
                                out=xb.reshape(rows, cols))
                self.apply(xb, of[start:stop], scratch, nonneg)
        return out
