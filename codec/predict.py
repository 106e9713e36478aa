"""Lossless prediction filters on the integer codes (docs/FORMAT.md, "Prediction").

The filters work on the *stored* codes s ∈ [0, N − 1] (N = 2^bits; signed codes
already offset by N/2) and are exact modulo N, so a residual of a b-bit code is
again a b-bit value and the inverse restores every code bit for bit:

- ``delta`` (id 1): r = s − s[..., j − 1] along the last axis (W);
- ``lorenzo`` (id 2): r = s[i, j] − s[i − 1, j] − s[i, j − 1] + s[i − 1, j − 1] over the
  last two axes (H, W), the 2-D Lorenzo predictor.

Neighbours outside the tensor count as 0, so the first residual of each row
(and the whole first row for ``lorenzo``) is the code itself. The forward
filter is a difference along each axis and its inverse a cumulative sum along
each axis, both in uint8 arithmetic (which wraps modulo 256, a multiple of N)
followed by a mask, so everything is a handful of vectorized numpy passes.

The entropy coder then sees the *centred* residual t = (r + N/2) mod N, so the
frequent small residuals ±k form one contiguous run of symbols around N/2.
"""

from __future__ import annotations

import numpy as np

NONE, DELTA, LORENZO = 0, 1, 2
NAMES = {"none": NONE, "delta": DELTA, "lorenzo": LORENZO}
BY_ID = {v: k for k, v in NAMES.items()}


def min_ndim(predictor: int) -> int:
    """Dimensions a predictor needs: delta runs along one axis, lorenzo along two."""
    return {NONE: 0, DELTA: 1, LORENZO: 2}[predictor]


def _diff(a: np.ndarray, axis: int) -> np.ndarray:
    """a − a shifted by one along ``axis`` (0 before the start), in uint8 (mod 256)."""
    out = a.copy()
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis] = slice(None, -1)
    dst[axis] = slice(1, None)
    np.subtract(a[tuple(dst)], a[tuple(src)], out=out[tuple(dst)])
    return out


def forward(stored: np.ndarray, bits: int, predictor: int) -> np.ndarray:
    """Entropy-coder symbols of the stored codes: the codes themselves for ``none``,
    otherwise the centred residuals (uint8, same shape)."""
    s = np.ascontiguousarray(stored, dtype=np.uint8)
    if predictor == NONE:
        return s
    if s.ndim < min_ndim(predictor):
        raise ValueError(f"predictor {BY_ID[predictor]!r} needs at least "
                         f"{min_ndim(predictor)} dimensions, the tensor has {s.ndim}")
    r = _diff(s, -1)
    if predictor == LORENZO:
        r = _diff(r, -2)
    n_levels = 1 << bits
    r += np.uint8(n_levels >> 1)
    if bits < 8:
        r &= np.uint8(n_levels - 1)
    return r


def inverse(symbols: np.ndarray, bits: int, predictor: int) -> np.ndarray:
    """The stored codes back from :func:`forward`'s symbols (uint8, same shape)."""
    t = np.ascontiguousarray(symbols, dtype=np.uint8)
    if predictor == NONE:
        return t
    n_levels = 1 << bits
    r = t - np.uint8(n_levels >> 1)  # uint8 wraps: (t - N/2) mod 256
    if predictor == LORENZO:
        r = np.cumsum(r, axis=-2, dtype=np.uint8)
    r = np.cumsum(r, axis=-1, dtype=np.uint8)
    if bits < 8:
        r &= np.uint8(n_levels - 1)
    return r
