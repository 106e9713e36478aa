"""Cache-sized blocks of a C-contiguous tensor, each with its channels.

Every data path walks the flat tensor block by block so scratch memory stays
one chunk whatever the tensor size. A per-channel block is a 2-D
(rows, cols) view whose rows each belong to one channel, so parameters
broadcast as a (rows, 1) column with no Python loop per channel or element.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import prod

import numpy as np

CHUNK = 1 << 16  # elements: 256 KiB of float32 scratch stays in L2


def iter_blocks(shape: tuple[int, ...], axis: int | None, chunk: int = CHUNK
                ) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
    """Yield (start, stop, rows, cols, channel_of_each_row or None)."""
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
    return param.reshape(-1)[ch][:, None]


def mean_abs(x: np.ndarray, axis: int | None) -> np.ndarray:
    """mean(|x|) per tensor (0-d) or per channel (1-D), in float64, without a full temporary."""
    c = 1 if axis is None else x.shape[axis]
    sums = np.zeros(c)
    counts = np.zeros(c)
    xf = x.reshape(-1)
    for start, stop, rows, cols, ch in iter_blocks(x.shape, axis):
        rs = np.abs(xf[start:stop].reshape(rows, cols)).sum(axis=1, dtype=np.float64)
        idx = np.zeros(rows, np.intp) if ch is None else ch
        sums += np.bincount(idx, weights=rs, minlength=c)
        counts += np.bincount(idx, minlength=c) * cols
    mean = np.divide(sums, counts, out=np.zeros(c), where=counts > 0)
    return mean.reshape(()) if axis is None else mean
