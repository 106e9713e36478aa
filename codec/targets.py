"""Targets instead of bit widths, and ``method="auto"`` (docs/CODECS.md, "Targets").

``codec.encode`` hands over here when one of ``target_bits``, ``max_abs_error``
or ``target_snr_db`` is given, or when ``method="auto"``. Every candidate is a
real encoding of the tensor; the one returned meets the target with the fewest
bytes (``max_abs_error``, ``target_snr_db``) or the best SNR within the budget
(``target_bits``).

Candidates for one method:

- **uniform steps** (``linear``, ``symmetric``) with a lossless stage: the
  step Δ is the knob, the zero point puts the whole data range on the code
  range and the bit width is the smallest whose 2^b levels cover it (so there
  is no clipping until Δ would need more than 8 bits of levels). This is
  entropy-coded uniform scalar quantization, which is within 0.25 bits per
  element of the rate–distortion bound at high rate; Δ is bisected (on a log
  scale) to meet the target;
- **fixed bit widths** 1–8 with a clipping rule (``minmax`` and ``mse`` unless
  ``clip=`` is given), with the lossless stage when enabled: the companders'
  only candidates, and the uniform methods' when there is no lossless stage or
  Δ is pinned at the 8-bit limit.

``max_abs_error`` is a guarantee: uniform methods take Δ just under 2·bound with
no clipping at all, other methods only bit widths whose worst error fits, and
the chosen stream is decoded and every element checked before it is returned
(a failed check halves Δ and tries again). A bound the 256 levels of 8-bit codes
cannot reach raises ``ValueError`` naming the smallest reachable bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import api as _api
from . import calibrate, container, mappings
from . import entropy as lossless
from . import predict
from .mappings.base import other_axes

_GIVEN = frozenset({"scale", "zero_point", "max_abs", "beta", "lam"})
_UNIFORM = ("linear", "symmetric")
_BISECT = 24


@dataclass
class Problem:
    x: np.ndarray  # the caller's array (for the final max_abs_error check)
    x32: np.ndarray
    dtype: np.dtype
    axis: int | None
    signed: bool | None
    opts: dict[str, Any]
    clip: str | None
    percentile: float
    coders: list[int]
    predictors: list[int]
    energy: float = 0.0
    _ranges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.x32.size)

    def clips(self) -> list[str]:
        return [self.clip] if self.clip is not None else ["minmax", "mse"]


@dataclass
class Candidate:
    blob: bytes
    q: Any
    restricted: bool
    mse: float
    method: str

    @property
    def size(self) -> int:
        return len(self.blob)


def _mse(p: Problem, q: Any) -> float:
    if p.n == 0:
        return 0.0
    d = _api.dequantize(q)
    np.subtract(d, p.x32, out=d)
    np.square(d, out=d)
    return float(d.sum(dtype=np.float64)) / p.n


def snr_db(energy: float, mse: float) -> float:
    if mse <= 0:
        return math.inf
    if energy <= 0:
        return -math.inf
    return 10.0 * math.log10(energy / mse)


def _candidate(p: Problem, method: str, bits: int, clip: str, given: dict[str, Any] | None,
               exact_size: bool = True) -> Candidate | None:
    opts = dict(p.opts)
    if given:
        opts.update(given)
    try:
        q, restricted = _api._quantize(p.x32, method, bits, p.axis, p.signed, opts,
                                       clip if not given else "minmax", p.percentile)
    except ValueError:
        return None  # e.g. 1-bit signed codes of a method that has none
    q = replace(q, dtype=p.dtype)  # x32 is float32: the stream restores the caller's dtype
    blob = _api._encode_q(q, restricted, p.coders, p.predictors) if exact_size else b""
    return Candidate(blob, q, restricted, _mse(p, q), method)


# ----------------------------------------------------------------------------- uniform steps


def _ranges(p: Problem, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the data per tensor or channel as float32: linear's [min(x,0), max(x,0)],
    symmetric's ±max|x| (0 below when the codes are unsigned)."""
    if method in p._ranges:
        return p._ranges[method]
    red = other_axes(p.x32.ndim, p.axis)
    if p.n == 0:
        z = np.zeros(() if p.axis is None else (p.x32.shape[p.axis],), np.float32)
        mn = mx = z
    else:
        mn = np.asarray(np.min(p.x32, axis=red), np.float32)
        mx = np.asarray(np.max(p.x32, axis=red), np.float32)
    if method == "linear":
        out = (np.minimum(mn, np.float32(0)), np.maximum(mx, np.float32(0)))
    else:
        a = np.maximum(np.abs(mn), np.abs(mx))
        signed = bool(np.any(mn < 0)) if p.signed is None else bool(p.signed)
        out = (-a if signed else np.zeros_like(a), a)
    p._ranges[method] = out
    return out


def _step_params(p: Problem, method: str, delta: np.float32) -> tuple[int, dict[str, Any]]:
    """Bit width and given parameters putting the data range on the grid of step Δ."""
    lo, hi = _ranges(p, method)
    d = np.float32(delta)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        k_lo = np.rint(-lo / d).astype(np.float64)  # float32 division, as the quantizer does
        k_hi = np.rint(hi / d).astype(np.float64)
    if method == "linear":
        levels = min(float(np.max(k_lo + k_hi)) + 1, 1e9)  # inf/nan (Δ underflow): clipped
        levels = levels if levels == levels else 1e9
        bits = int(min(8, max(1, math.ceil(math.log2(max(levels, 1))))))
        top = (1 << bits) - 1
        if levels <= top + 1:
            z = k_lo
        else:  # more than 256 levels: clip both sides in proportion to the range
            tot = np.maximum(k_lo + k_hi, 1)
            z = np.clip(np.rint(k_lo * top / tot), 0, top)
        if p.signed:
            z = z - (1 << (bits - 1))
        given = {"scale": np.broadcast_to(d, np.shape(lo)).copy(), "zero_point": z}
        if p.axis is None:
            given = {"scale": float(d), "zero_point": int(z)}
        return bits, given
    k = float(np.max(np.maximum(k_lo, k_hi)))
    k = min(k, 1e9) if k == k else 1e9
    signed = bool(np.any(lo < 0))
    need = 2 * (k + 1) if signed else k + 1
    bits = int(min(8, max(2 if signed else 1, math.ceil(math.log2(max(need, 1))))))
    return bits, {"scale": float(d), "signed": signed}


def _step_candidate(p: Problem, method: str, delta: float, exact: bool = True
                    ) -> Candidate | None:
    bits, given = _step_params(p, method, np.float32(delta))
    signed = given.pop("signed", None)
    saved = p.signed
    if signed is not None:
        p.signed = signed
    try:
        return _candidate(p, method, bits, "minmax", given, exact_size=exact)
    finally:
        p.signed = saved


def _estimated_size(p: Problem, c: Candidate) -> int:
    """Bytes of the candidate's stream, estimated from the ANS model when ANS is in use."""
    q = c.q
    n = q.codes.size
    packed = (n * q.bits + 7) // 8
    stored = _api._stored(q.codes, q.bits)
    payload = packed
    if n and lossless.ANS in p.coders:
        best = None
        for pid in p.predictors:
            sym = predict.forward(stored, q.bits, pid)
            est = lossless.estimate(sym, q.bits)
            if best is None or est < best[0]:
                best = (est, sym)
        assert best is not None
        payload = min(payload, best[0])
        if lossless.ZSTD in p.coders:  # zstd also sees runs and repeats (e.g. flat regions)
            payload = min(payload, len(lossless.zstd_encode(best[1])))
    elif n and p.coders:
        return len(_api._encode_q(q, c.restricted, p.coders, p.predictors))
    mapping = mappings.get(q.method)
    header = container.write_header(mapping, 0, 0, q.dtype, q.bits, q.shape, q.axis,
                                    _api._stream_params(q), payload)
    return len(header) + payload + container.CRC_SIZE


def _max_levels(p: Problem, method: str) -> float:
    """Steps of the data range that 8-bit codes hold: 255 (linear, unsigned symmetric),
    254 (signed symmetric: codes ±127 around 0)."""
    lo, _ = _ranges(p, method)
    return 254.0 if method == "symmetric" and np.any(lo < 0) else 255.0


def _span(p: Problem, method: str) -> float:
    lo, hi = _ranges(p, method)
    return float(np.max(hi.astype(np.float64) - lo.astype(np.float64))) if np.size(lo) else 0.0


def _levels_needed(p: Problem, method: str, delta: float) -> float:
    """Codes that step Δ needs to cover the range without clipping (as the quantizer rounds)."""
    lo, hi = _ranges(p, method)
    d = np.float32(delta)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        k_lo = np.rint(-lo / d).astype(np.float64)
        k_hi = np.rint(hi / d).astype(np.float64)
    if method == "linear":
        return float(np.max(k_lo + k_hi)) + 1
    k = float(np.max(np.maximum(k_lo, k_hi)))
    return 2 * (k + 1) if np.any(lo < 0) else k + 1


def _delta_bounds(p: Problem, method: str) -> tuple[float, float]:
    span = _span(p, method)
    if not span > 0:
        return 1.0, 1.0
    return span / _max_levels(p, method) * (1 + 2**-12), span * 2.0


def _bisect(lo: float, hi: float, good_small: Any) -> float | None:
    """Largest Δ in [lo, hi] (log scale) with ``good_small(Δ)`` true, assuming it holds for
    small Δ and fails for large; None if it fails at ``lo``."""
    if not good_small(lo):
        return None
    if good_small(hi):
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(_BISECT):
        mid = (a + b) / 2
        if good_small(math.exp(mid)):
            a = mid
        else:
            b = mid
    return math.exp(a)


def _smallest_step_ok(p: Problem, method: str, budget: int,
                      bounds: tuple[float, float] | None = None) -> Candidate | None:
    """Entropy-coded uniform quantization with the finest step whose stream fits ``budget``."""
    d_lo, d_hi = bounds or _delta_bounds(p, method)

    def fits(delta: float) -> bool:
        c = _step_candidate(p, method, delta, exact=False)
        return c is not None and _estimated_size(p, c) <= budget

    # fits() is true for large Δ: search the smallest Δ that fits = bisect on 1/Δ.
    inv = _bisect(1.0 / d_hi, 1.0 / d_lo, lambda v: fits(1.0 / v))
    if inv is None:
        return None
    delta = 1.0 / inv
    for _ in range(12):  # the estimate can be a few bytes off: step up until it really fits
        c = _step_candidate(p, method, delta)
        if c is not None and c.size <= budget:
            return c
        delta *= 1.01
    return None


# ----------------------------------------------------------------------------- per target


def _better_snr(a: Candidate | None, b: Candidate | None) -> Candidate | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if (b.mse, b.size) < (a.mse, a.size) else a


def _smaller(a: Candidate | None, b: Candidate | None) -> Candidate | None:
    if a is None:
        return b
    if b is None:
        return a
    return b if (b.size, b.mse) < (a.size, a.mse) else a


def _bit_widths(method: str) -> range:
    return range(1, 9)


def _finish(p: Problem, c: Candidate) -> Candidate:
    if not c.blob:
        c.blob = _api._encode_q(c.q, c.restricted, p.coders, p.predictors)
    return c


def _fixed_for_budget(p: Problem, method: str, budget: int, top: int = 8) -> Candidate | None:
    """The best fixed-bit-width candidate within ``budget``: the widest width whose
    ``minmax`` stream fits (sizes shrink with the width), then the clipping rules there."""
    for bits in reversed(range(1, top + 1)):
        found = None
        for clip in p.clips():
            c = _candidate(p, method, bits, clip, None, exact_size=False)
            if c is None or _estimated_size(p, c) > budget:
                if clip == "minmax" and p.clip is None:
                    break  # the widest range rarely codes larger than a clipped one: next width
                continue
            c = _finish(p, c)
            if c.size <= budget:
                found = _better_snr(found, c)
        if found is not None:
            return found
    return None


def _clipped_steps(p: Problem, method: str) -> tuple[float, float] | None:
    """Steps below the 8-bit no-clipping limit worth trying: down to the step of the 8-bit
    mse-clipped fit (finer steps clip more than they gain)."""
    opt = _candidate(p, method, 8, "mse", None, exact_size=False)
    d_lo, _ = _delta_bounds(p, method)
    if opt is None or opt.q.scale is None:
        return None
    d_opt = float(np.max(opt.q.scale))
    return (d_opt, d_lo) if 0 < d_opt < d_lo else None


def _for_bits(p: Problem, method: str, budget: int) -> Candidate | None:
    if method in _UNIFORM and p.coders:
        best = _smallest_step_ok(p, method, budget)
        if best is not None and best.q.bits < 8:
            return best
        # Δ pinned at the 8-bit limit with budget left: finer steps that clip the tails,
        # and the fixed widths, compete.
        clipped = _clipped_steps(p, method)
        if clipped is not None:
            best = _better_snr(best, _smallest_step_ok(p, method, budget, clipped))
        return _better_snr(best, _fixed_for_budget(p, method, budget))
    return _fixed_for_budget(p, method, budget)


def _for_snr(p: Problem, method: str, target: float) -> Candidate | None:
    best = None
    if method in _UNIFORM and p.coders:
        d_lo, d_hi = _delta_bounds(p, method)

        def ok(delta: float) -> bool:
            c = _step_candidate(p, method, delta, exact=False)
            return c is not None and snr_db(p.energy, c.mse) >= target

        delta = _bisect(d_lo, d_hi, ok)
        if delta is None:  # not even at the 8-bit limit: finer steps that clip the tails
            clipped = _clipped_steps(p, method)
            if clipped is not None:
                delta = _bisect(clipped[0], clipped[1], ok)
        if delta is not None:
            return _step_candidate(p, method, delta)
    for bits in _bit_widths(method):  # the first width that meets it is the smallest
        found = None
        for clip in p.clips():
            c = _candidate(p, method, bits, clip, None)
            if c is not None and snr_db(p.energy, c.mse) >= target:
                found = _smaller(found, c)
        if found is not None:
            return found
    return best


def _max_err(p: Problem, blob: bytes) -> float:
    if p.n == 0:
        return 0.0
    y = _api.decode(blob).astype(np.float64)
    return float(np.max(np.abs(y - np.asarray(p.x, np.float64))))


def _uniform_max_error(p: Problem, method: str, bound: float) -> Candidate:
    span = _span(p, method)
    # Δ just under 2·bound: |x − x̂| <= Δ/2 plus float32 rounding, which the margin covers.
    # A bound beyond the data's range is met by any step that covers it: cap Δ there.
    want = min(2.0 * bound * (1 - 2**-10), 2.0 * span if span > 0 else 1.0)
    delta = float(np.float32(want)) if want < 3e38 else 3e38
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"max_abs_error={bound:g} is outside the float32 range of steps")
    for _ in range(4):
        levels = _levels_needed(p, method, delta) if span > 0 else 1.0
        if levels > 256:
            smallest = span / _max_levels(p, method) / 2
            raise ValueError(
                f"max_abs_error={bound:g} needs {levels:.0f} codes of step {delta:.6g} to "
                f"cover this data's range ({span:.6g}) with {method} without clipping, more "
                f"than 8-bit codes hold; the smallest bound reachable is about {smallest:.6g}")
        c = _step_candidate(p, method, delta)
        if c is not None and _max_err(p, c.blob) <= bound:
            return c
        delta = float(np.float32(delta / 2))  # float16 output rounding, float32 resolution
        if delta <= 0:
            break
    raise ValueError(f"max_abs_error={bound:g} cannot be guaranteed for this data with "
                     f"{method}: it is below the float32/float16 resolution of the values")


def _for_max_error(p: Problem, method: str, bound: float) -> Candidate | None:
    if method in _UNIFORM:
        return _uniform_max_error(p, method, bound)
    for bits in _bit_widths(method):  # companders: no clipping, the first width that holds
        c = _candidate(p, method, bits, "minmax", None)
        if c is not None and _max_err(p, c.blob) <= bound:
            return c
    raise ValueError(f"max_abs_error={bound:g} is not reachable with {method} at 8 bits or "
                     f"fewer on this data; use linear or symmetric")


# ----------------------------------------------------------------------------- entry point


def encode(x: Any, method: str, bits: int, axis: Any, signed: bool | None,
           opts: dict[str, Any], clip: str | None, percentile: float, entropy: Any,
           predictor: str, target_bits: Any, max_abs_error: Any, target_snr_db: Any
           ) -> bytes:
    targets = {k: v for k, v in (("target_bits", target_bits), ("max_abs_error", max_abs_error),
                                 ("target_snr_db", target_snr_db)) if v is not None}
    if len(targets) > 1:
        raise ValueError(f"give at most one target, got {sorted(targets)}")
    given = sorted(set(opts) & _GIVEN)
    if given and (targets or method == "auto"):
        raise ValueError(f"parameters {given} are fitted by the codec when a target or "
                         f"method='auto' is given; drop them")
    if method == "auto" and opts:
        raise ValueError(f"method='auto' takes no method options, got {sorted(opts)}")
    x32, dtype = _api._as_input(x)
    axis = _api._as_axis(axis, x32.ndim)
    _api._check_nan(x32, allow_inf=False)
    coders = lossless.coder_candidates(entropy)
    if not coders and entropy in (None, "none") and predictor not in (None, "auto", "none"):
        _api._predictors(predictor, coders, 2)  # ValueError: a predictor needs entropy=
    predictors = _api._predictors(predictor, [lossless.ANS], x32.ndim)
    p = Problem(x, x32, dtype, axis, signed, opts, clip, percentile, coders, predictors)
    p.energy = float(np.dot(x32.reshape(-1).astype(np.float64),
                            x32.reshape(-1).astype(np.float64)) / max(1, p.n))
    names = [m["name"] for m in mappings.methods()] if method == "auto" else [method]
    if method != "auto":
        mappings.get(method)  # unknown method: ValueError now
    best: Candidate | None = None
    errors: list[str] = []
    for name in names:
        try:
            if "target_bits" in targets:
                c = _for_bits(p, name, _budget(p, targets["target_bits"]))
            elif "target_snr_db" in targets:
                c = _for_snr(p, name, _as_float(targets["target_snr_db"], "target_snr_db"))
            elif "max_abs_error" in targets:
                c = _for_max_error(p, name, _bound(targets["max_abs_error"]))
            else:  # method="auto" at a given bit width
                c = _candidate(p, name, _api._as_bits(bits), clip or "minmax", None)
        except ValueError as exc:
            if method != "auto":
                raise
            errors.append(f"{name}: {exc}")
            continue
        if c is None:
            continue
        if "target_bits" in targets or not targets:
            best = _better_snr(best, c)
        else:
            best = _smaller(best, c)
    if best is None:
        what = ", ".join(f"{k}={v}" for k, v in targets.items()) or f"bits={bits}"
        detail = ("; ".join(errors)) if errors else "no bit width and clipping meets it"
        raise ValueError(f"cannot meet {what} with method={method!r} on this tensor: {detail}")
    return best.blob


def _as_float(v: Any, name: str) -> float:
    if isinstance(v, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, not {type(v).__name__}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _budget(p: Problem, target_bits: Any) -> int:
    t = _as_float(target_bits, "target_bits")
    if t <= 0:
        raise ValueError(f"target_bits must be > 0, got {t}")
    return int(math.floor(t * p.n / 8.0 + 1e-9)) if p.n else 1 << 62


def _bound(v: Any) -> float:
    b = _as_float(v, "max_abs_error")
    if b <= 0:
        raise ValueError(f"max_abs_error must be > 0, got {b}")
    return b
