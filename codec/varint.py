"""Unsigned LEB128 varints, as the bitstream writes them (docs/FORMAT.md)."""

from __future__ import annotations


def uleb128(n: int) -> bytes:
    """7 bits per byte, least significant group first, high bit on all but the last."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
