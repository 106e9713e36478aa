"""Shared by the stream tests: CRC resealing, random mutations, the decode invariant."""

from __future__ import annotations

import struct
import zlib

from hypothesis import strategies as st

import codec
from codec import FormatError


def seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def reseal(blob: bytes | bytearray) -> bytes:
    """Recompute the trailing CRC32 so that only the change under test is wrong."""
    return seal(bytes(blob[:-4]))


def mutate(data: st.DataObject, blob: bytes) -> bytes:
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate",
                                        "extend"]), label="op")
        if op == "truncate":
            del buf[data.draw(st.integers(0, len(buf))):]
        elif op == "extend":
            buf += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            if op == "flip":
                buf[i] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "set":
                buf[i] = data.draw(st.integers(0, 255))
            else:
                del buf[i:i + data.draw(st.integers(1, 8))]
    if len(buf) >= 4 and data.draw(st.booleans(), label="reseal"):
        buf = bytearray(reseal(buf))  # get past the CRC, into the parser and decoder
    return bytes(buf)


def decode_only_raises_format_errors(blob: bytes) -> None:
    try:
        info = codec.inspect(blob)
    except FormatError:
        info = None
    try:
        y = codec.decode(blob)
    except FormatError:
        assert info is None, "inspect accepted what decode refused"
        return
    assert info is not None
    assert list(y.shape) == info["shape"] and y.dtype.name == info["dtype"]


# Resealed garbage may decode to inf (e.g. a huge scale): warnings, not errors.
