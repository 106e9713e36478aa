"""The in-memory quantized tensor that sits between mapping and packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class QTensor:
    """Integer codes plus everything needed to map them back to reals.

    ``codes`` is ``uint8`` for unsigned codes and ``int8`` for signed codes,
    whatever ``bits`` is. For linear methods ``scale`` and ``zero_point`` hold
    the affine parameters (0-d for per-tensor, 1-D along ``axis`` for
    per-channel) and ``x̂ = (codes - zero_point) * scale``. Nonlinear methods
    keep their own parameters in ``params``; their ``scale``/``zero_point``
    are ``None``.
    """

    codes: np.ndarray
    method: str
    bits: int
    axis: int | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @property
    def signed(self) -> bool:
        return self.codes.dtype == np.int8

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def param(self, name: str) -> np.ndarray:
        """A parameter by name, including ``scale`` and ``zero_point``."""
        if name == "scale" and self.scale is not None:
            return self.scale
        if name == "zero_point" and self.zero_point is not None:
            return self.zero_point
        return self.params[name]

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        extra: dict[str, Any] = {}
        if self.scale is not None:
            extra["scale"] = self.scale.tolist()
            extra["zero_point"] = self.zero_point.tolist() if self.zero_point is not None else None
        extra.update({k: v.tolist() for k, v in self.params.items()})
        return (
            f"QTensor(method={self.method!r}, bits={self.bits}, shape={self.shape}, "
            f"signed={self.signed}, axis={self.axis}, {extra})"
        )
