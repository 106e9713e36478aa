"""Comma-separated numbers, as query parameters and CLI options spell per-channel values."""

from __future__ import annotations


def number_list(text: str) -> list[int | float] | None:
    values: list[int | float] = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(int(item))
        except ValueError:
            try:
                values.append(float(item))
            except ValueError:
                return None
    return values
