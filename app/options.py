"""Method options as query parameters, derived from ``codec.methods()``.

The library describes its options by name and doc only, so the value kinds
are kept here; an option the library adds later is still accepted (numbers
when they parse as numbers, text otherwise) and documented without a
change to the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import codec

from .numbers import number_list
from .problems import InvalidParameters

BOOLEAN = frozenset({"signed", "restricted"})
NUMBERS = frozenset({"scale", "zero_point", "mu", "max_abs", "beta", "lam"})
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_EXAMPLES = {"scale": ["0.05", "0.05,0.1,0.2"], "zero_point": ["128"], "mu": ["255"],
             "max_abs": ["6.0", "4,5,6"], "beta": ["1.5"], "lam": ["0.5"],
             "lam_fit": ["mse", "equiprobable"]}


@cache  # the registry is fixed once codec is imported; describing it costs ~0.1 ms a call
def method_names() -> frozenset[str]:
    return frozenset(m["name"] for m in codec.methods())


@cache
def docs() -> dict[str, str]:
    """Every option of every method, with one ``method: doc`` line per method."""
    out: dict[str, list[str]] = {}
    for m in codec.methods():
        for name, doc in m["options"].items():
            out.setdefault(name, []).append(f"{m['name']}: {doc}")
    return {name: "; ".join(lines) for name, lines in out.items()}


def parse(name: str, text: str) -> Any:
    """A query value as the keyword argument ``codec.encode`` expects."""
    if name in BOOLEAN:
        word = text.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise InvalidParameters(f"{name}: expected true or false, got {text!r}")
    values = number_list(text)
    if values is None:
        if name in NUMBERS:
            raise InvalidParameters(f"{name}: expected a number or a comma-separated list of "
                                    f"numbers, got {text!r}")
        return text
    return values[0] if len(values) == 1 else values


def from_query(query: Mapping[str, str], fixed: frozenset[str]) -> dict[str, Any]:
    """The method options in ``query``; 422 for names that are neither options nor ``fixed``."""
    known = docs()
    unknown = set(query) - set(known) - fixed
    if unknown:
        raise InvalidParameters(f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                                f"method options: {', '.join(sorted(known))}")
    return {name: parse(name, query[name]) for name in known if name in query}


def openapi_parameters() -> list[dict[str, Any]]:
    params = []
    for name, doc in sorted(docs().items()):
        if name in BOOLEAN:
            schema: dict[str, Any] = {"type": "boolean"}
        else:
            schema = {"type": "string"}
            if name not in NUMBERS:
                doc += " (a number, a comma-separated list of numbers, or text)"
            else:
                doc += " (a number, or a comma-separated list: one per channel along axis)"
        if name in _EXAMPLES:
            schema["examples"] = _EXAMPLES[name]
        params.append({"name": name, "in": "query", "required": False, "description": doc,
                       "schema": schema})
    return params
