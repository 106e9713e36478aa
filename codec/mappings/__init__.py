"""The registry of mappings: one module per method, looked up by name or stream id."""

from __future__ import annotations

from typing import Any

from .base import Mapping, Param
from .exp import Exp
from .linear import Linear
from .log import Log
from .mulaw import MuLaw
from .symmetric import Symmetric

_BY_NAME: dict[str, Mapping] = {}
_BY_ID: dict[int, Mapping] = {}


def register(mapping: Mapping) -> Mapping:
    """Add a mapping; its name and stream id must be new."""
    if mapping.name in _BY_NAME or mapping.id in _BY_ID:
        raise ValueError(f"mapping {mapping.name!r} (id {mapping.id}) is already registered")
    if not 0 < mapping.id < 256:
        raise ValueError("a mapping id is one byte, 1..255")
    _BY_NAME[mapping.name] = mapping
    _BY_ID[mapping.id] = mapping
    return mapping


def get(name: str) -> Mapping:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_BY_NAME))}"
        ) from None


def by_id(mapping_id: int) -> Mapping | None:
    return _BY_ID.get(mapping_id)


def methods() -> list[dict[str, Any]]:
    """Every registered method with its bit ranges and parameters."""
    return [m.describe() for m in sorted(_BY_NAME.values(), key=lambda m: m.id)]


for _m in (Linear(), Symmetric(), MuLaw(), Log(), Exp()):
    register(_m)

__all__ = ["Mapping", "Param", "by_id", "get", "methods", "register"]
