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
            if not np.all(np.isfinite(v)):
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
    if not (np.all(np.isfinite(mn)) and np.all(np.isfinite(mx))):
        raise ValueError("input contains NaN or Inf; parameters cannot be fitted")
    return mn, mx


def has_negative(x: np.ndarray) -> bool:
    """Whether any element is < 0; unlike ``min_max`` this accepts ±inf (given parameters)."""
    return bool(x.size) and bool(blocks.tensor_min(x) < 0)


def to_f32_at_least(v: np.ndarray) -> np.ndarray:
    """float32 values >= v (rounded up), so fitted ranges never shrink."""
    v = np.asarray(v, np.float64)
    f = v.astype(np.float32)
    low = f.astype(np.float64) < v
    if np.any(low):
        f = np.where(low, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)
    return f


def positive_scale(v: np.ndarray) -> np.ndarray:
    """A usable float32 step: underflow goes to the smallest subnormal, zero range to 1."""
    f = to_f32_at_least(v)
    tiny = np.finfo(np.float32).smallest_subnormal
    return np.where(np.asarray(v) > 0, np.maximum(f, tiny), np.float32(1.0)).astype(np.float32)


def below_overflow(scale: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """``scale`` one float32 step lower where the level nearest ``amax`` (the data's largest
    magnitude) is beyond FLT_MAX: data at ±FLT_MAX with Δ rounded up would decode to ±inf."""
    scale = np.asarray(scale, np.float32)
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
