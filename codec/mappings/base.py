"""What every mapping provides, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import blocks

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """A parameter stored in the bitstream, in declaration order."""

    name: str
    dtype: str  # little-endian numpy dtype of its stream encoding
    per_channel: bool  # one value per channel when the stream is per-channel
    doc: str


class Mapping:
    """A map from reals to integer codes and back.

    Codes are unsigned in [0, N-1] or signed in [-N/2, N/2-1] (N = 2**bits);
    the stream stores signed codes offset by N/2. ``fit`` turns the data and
    user options into stream parameters; ``quantize``/``dequantize`` use only
    those, so given parameters bypass calibration entirely.
    """

    name: ClassVar[str]
    id: ClassVar[int]
    linear: ClassVar[bool]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    options: ClassVar[dict[str, str]]  # keyword arguments accepted by encode/quantize

    def bit_range(self, signed: bool) -> tuple[int, int]:
        return (2, 8) if signed else (1, 8)

    def fit(self, x: np.ndarray, bits: int, axis: int | None, signed: bool | None,
            opts: dict[str, Any]) -> tuple[bool, Params]:
        raise NotImplementedError

    def wants_abs_sum(self, axis: int | None, opts: dict[str, Any]) -> bool:
        """Whether :meth:`fit` will take the per-tensor mean |x| (``blocks.mean_abs``), so
        the input check should sum |x| in the pass it makes anyway."""
        return False

    def check(self, params: Params, bits: int, signed: bool) -> None:
        """Raise ValueError if stream parameters are unusable."""
        for p in self.params:
            v = params[p.name]
            if not every(np.isfinite(v)):
                raise ValueError(f"{self.name}: parameter {p.name!r} must be finite")

    def quantize(self, x: np.ndarray, bits: int, axis: int | None, signed: bool,
                 params: Params, restricted: bool = False, out: np.ndarray | None = None,
                 x_range: tuple[float, float] | None = None) -> np.ndarray:
        """Codes of C-contiguous float32 ``x`` (int8 if ``signed``, else uint8), written to
        ``out`` (C-contiguous, ``x``'s shape) when given. ``x_range`` is the (min, max) of
        ``x`` when the caller knows it; a mapping may use it to skip work, never to change
        a code."""
        raise NotImplementedError

    def dequantize(self, codes: np.ndarray, bits: int, axis: int | None, signed: bool,
                   params: Params, out: np.ndarray | None = None) -> np.ndarray:
        """float32 values of C-contiguous ``codes``, written to ``out`` when given."""
        raise NotImplementedError

    def quantize_stored(self, x: np.ndarray, axis: int | None, signed: bool, params: Params,
                        restricted: bool, out: np.ndarray,
                        x_range: tuple[float, float] | None = None) -> None:
        """8-bit codes of ``x`` as the stream stores them, into uint8 ``out``: signed codes
        offset by 128, i.e. with the top bit flipped."""
        self.quantize(x, 8, axis, signed, params, restricted,
                      out.view(np.int8) if signed else out, x_range)
        if signed:
            np.bitwise_xor(out, np.uint8(0x80), out=out)

    def dequantize_stored(self, stored: np.ndarray, axis: int | None, signed: bool,
                          params: Params, out: np.ndarray, scratch: np.ndarray | None) -> None:
        """float32 values of 8-bit codes as the stream stores them (uint8, see
        :meth:`quantize_stored`) into ``out``; ``scratch``, uint8 of ``stored``'s size, is
        given for signed codes."""
        codes = stored
        if signed:
            codes = np.bitwise_xor(stored, np.uint8(0x80), out=scratch.reshape(stored.shape))
            codes = codes.view(np.int8)
        self.dequantize(codes, 8, axis, signed, params, out)

    def describe(self) -> dict[str, Any]:
        lo_u, hi_u = self.bit_range(False)
        lo_s, hi_s = self.bit_range(True)
        return {
            "name": self.name,
            "id": self.id,
            "linear": self.linear,
            "summary": self.summary,
            "bits": {"unsigned": [lo_u, hi_u], "signed": [lo_s, hi_s]},
            "options": dict(self.options),
            "stream_params": [
                {"name": p.name, "dtype": p.dtype, "per_channel": p.per_channel, "doc": p.doc}
                for p in self.params
            ],
        }


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    n = 1 << bits
    return (-(n >> 1), (n >> 1) - 1) if signed else (0, n - 1)


def other_axes(ndim: int, axis: int | None) -> tuple[int, ...] | None:
    return None if axis is None else tuple(i for i in range(ndim) if i != axis)


def channels(x: np.ndarray, axis: int | None) -> int:
    return 1 if axis is None else x.shape[axis]


def min_max(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (0-d) or per-channel (1-D) min and max as float64; zeros when empty."""
    if x.size == 0:
        z = np.zeros(() if axis is None else (x.shape[axis],))
        return z, z.copy()
    mn, mx = blocks.min_max(x, axis)  # one fused pass (np.min then np.max is two)
    if not (every(np.isfinite(mn)) and every(np.isfinite(mx))):
        raise ValueError("input contains NaN or Inf; parameters cannot be fitted")
    return mn, mx


def has_negative(x: np.ndarray) -> bool:
    """Whether any element is < 0; unlike ``min_max`` this accepts ±inf (given parameters)."""
    return bool(x.size) and bool(blocks.tensor_min(x) < 0)


def every(mask: Any) -> bool:
    """``np.all`` of a small boolean array (a parameter check): ``bool`` for 0-d, which
    skips numpy's reduction machinery (5 µs a call, several per fit)."""
    mask = np.asarray(mask)
    return bool(mask) if mask.ndim == 0 else bool(mask.all())


def some(mask: Any) -> bool:
    """``np.any`` of a small boolean array, as :func:`every`."""
    mask = np.asarray(mask)
    return bool(mask) if mask.ndim == 0 else bool(mask.any())


class ArrayOps:
    """The element-wise operations of the range fits, on per-channel float64 arrays."""

    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    rint = staticmethod(np.rint)
    abs = staticmethod(np.abs)


class FloatOps:
    """The same on per-tensor Python floats: IEEE double arithmetic like numpy's float64,
    with numpy's pick between equal values (``maximum(a, b)`` is ``a`` unless ``b > a``;
    no NaN reaches a fit), but none of the ~20 numpy calls on 0-d arrays (1-5 µs each)
    that would dominate fitting a small tensor. tests/test_kernels.py checks both give the
    same parameters."""

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def minimum(a: float, b: float) -> float:
        return b if b < a else a

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return b if b > a else a

    @staticmethod
    def rint(v: float) -> float:
        return float(round(v))  # half to even, as np.rint

    abs = staticmethod(abs)


def fit_ops(dmin: Any) -> type[ArrayOps] | type[FloatOps]:
    return FloatOps if isinstance(dmin, float) else ArrayOps


def scalars(*values: np.ndarray) -> tuple[Any, ...]:
    """0-d fitted statistics as Python floats (per-tensor fits then run on
    :class:`FloatOps`), per-channel ones unchanged."""
    return tuple(float(v) if np.ndim(v) == 0 else v for v in values)


def to_f32_at_least(v: Any) -> Any:
    """float32 values >= v (rounded up), so fitted ranges never shrink (a float32 scalar for
    a Python float)."""
    if isinstance(v, float):
        f = np.float32(v)
        return np.nextafter(f, np.float32(np.inf)) if float(f) < v else f
    v = np.asarray(v, np.float64)
    f = v.astype(np.float32)
    low = f.astype(np.float64) < v
    if some(low):
        with np.errstate(over="ignore"):  # FLT_MAX lanes, which np.where does not pick
            f = np.where(low, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)
    return f


_F32_TINY_SUB = np.finfo(np.float32).smallest_subnormal


def positive_scale(v: Any) -> np.ndarray:
    """A usable float32 step: underflow goes to the smallest subnormal, zero range to 1."""
    f = to_f32_at_least(v)
    if isinstance(v, float):
        return np.asarray(FloatOps.maximum(f, _F32_TINY_SUB) if v > 0 else np.float32(1.0),
                          np.float32)
    return np.where(np.asarray(v) > 0, np.maximum(f, _F32_TINY_SUB),
                    np.float32(1.0)).astype(np.float32)


def below_overflow(scale: np.ndarray, amax: Any) -> np.ndarray:
    """``scale`` one float32 step lower where the level nearest ``amax`` (the data's largest
    magnitude) is beyond FLT_MAX: data at ±FLT_MAX with Δ rounded up would decode to ±inf."""
    scale = np.asarray(scale, np.float32)
    if isinstance(amax, float) and scale.ndim == 0:
        s = scale[()]
        k = np.float32(FloatOps.rint(amax / float(s)))
        with np.errstate(over="ignore", invalid="ignore"):
            top = k * s
        return scale if np.isfinite(top) else np.asarray(np.nextafter(s, np.float32(0)))
    k = np.rint(np.asarray(amax, np.float64) / scale.astype(np.float64)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        top = k * scale
    return np.where(np.isfinite(top), scale, np.nextafter(scale, np.float32(0))).astype(np.float32)


def as_param(value: Any, name: str, dtype: Any, axis: int | None, channels_: int) -> np.ndarray:
    """A user-given parameter as a 0-d or 1-D array of the right length."""
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parameter {name!r} must be numeric: {exc}") from None
    if arr.ndim == 0 or arr.size == 1 and axis is None:
        arr = arr.reshape(())
        return arr if axis is None else np.full(channels_, arr, dtype=arr.dtype)
    if axis is None:
        raise ValueError(f"parameter {name!r} has {arr.size} values but axis is None (per-tensor)")
    if arr.ndim != 1 or arr.size != channels_:
        raise ValueError(
            f"parameter {name!r} must be a scalar or have {channels_} values (one per channel), "
            f"got shape {arr.shape}"
        )
    return arr


def broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or param.ndim == 0:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)
