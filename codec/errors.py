"""Exceptions raised by the codec library."""

from __future__ import annotations


class FormatError(ValueError):
    """A bitstream is malformed, truncated, corrupted or over a limit."""


class MissingExtraError(ImportError):
    """A stream needs an optional dependency that is not installed."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this stream needs the optional dependency {module!r}; "
            f"install it with: pip install 'featcodec[{extra}]'"
        )
        self.extra = extra
        self.module = module
