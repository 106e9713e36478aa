"""Tests for codec.bitpack: reference equivalence, golden bytes, layouts, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import bitpack
from codec.bitpack import pack, packed_size, unpack

ALL_BITS = list(range(1, 9))


# --- references -------------------------------------------------------------


def ref_pack(codes: np.ndarray | list[int], bits: int) -> bytes:
    """Bit-by-bit transcription of the format: code i's bit j is stream bit
    i*bits + j, and stream bit k is bit k % 8 of byte k // 8."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(int(c) for c in codes):
        for j in range(bits):
            k = i * bits + j
            out[k // 8] |= ((code >> j) & 1) << (k % 8)
    return bytes(out)


def ref_unpack(buf: bytes, bits: int, n: int) -> list[int]:
    return [
        sum(((buf[(i * bits + j) // 8] >> ((i * bits + j) % 8)) & 1) << j for j in range(bits))
        for i in range(n)
    ]


def ref_pack_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """The same format as a bit matrix, fast enough for million-code inputs:
    row i holds code i's bits LSB first; the rows concatenated are the stream."""
    matrix = np.unpackbits(codes.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(matrix.reshape(-1), bitorder="little")


@contextlib.contextmanager
def chunk_size(codes: int) -> Iterator[None]:
    """Shrink the codec's chunk so that small inputs cross chunk boundaries."""
    saved = bitpack._CHUNK
    bitpack._CHUNK = codes
    try:
        yield
    finally:
        bitpack._CHUNK = saved


def random_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, n, dtype=np.uint8)


def test_references_agree() -> None:
    rng = np.random.default_rng(0)
    for bits in ALL_BITS:
        for n in (0, 1, 5, 8, 13, 64, 101):
            codes = random_codes(rng, n, bits)
            expected = ref_pack(codes, bits)
            assert ref_pack_np(codes, bits).tobytes() == expected
            assert ref_unpack(expected, bits, n) == codes.tolist()


# --- packed_size ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "bits", "size"),
    [(0, 1, 0), (0, 8, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (8, 3, 3),
     (1, 8, 1), (5, 8, 5), (2, 4, 1), (3, 4, 2), (7, 7, 7), (10**12, 5, 625 * 10**9)],
)
def test_packed_size(n: int, bits: int, size: int) -> None:
    assert packed_size(n, bits) == size


# --- golden bytes -----------------------------------------------------------

GOLDEN = [
    # b=3: byte0 = 1 | 2<<3 | (3&3)<<6, byte1 = 3>>2
    (3, [1, 2, 3], "d1 00"),
    # b=3: 0..7 is 0o76543210 = 0xFAC688 per 8 codes (exercises the bulk path)
    (3, list(range(8)) * 2, "88 c6 fa 88 c6 fa"),
    (5, [1, 31, 0, 17], "e1 83 08"),
    (5, [1, 31, 0, 17, 2, 4, 8, 16, 30], "e1 83 28 08 82 1e"),
    (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], "0d 01"),
    (4, [0x1, 0xA, 0xF], "a1 0f"),
    (4, [0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8], "21 43 65 87"),
    (6, [63, 0, 63, 0, 1], "3f f0 03 01"),
    (7, [127] * 8 + [1], "ff ff ff ff ff ff ff 01"),
    (2, [1, 2, 3, 0, 3], "39 03"),
    (8, [0, 7, 255], "00 07 ff"),
]


@pytest.mark.parametrize(("bits", "codes", "hexbytes"), GOLDEN)
def test_golden(bits: int, codes: list[int], hexbytes: str) -> None:
    expected = bytes.fromhex(hexbytes)
    assert ref_pack(codes, bits) == expected  # the table itself is right
    packed = pack(np.array(codes, dtype=np.uint8), bits)
    assert packed.tobytes() == expected
    assert unpack(expected, bits, len(codes)).tolist() == codes


# --- round trips against the references ---------------------------------------


def check_roundtrip(codes: np.ndarray, bits: int, expected: bytes | None = None) -> None:
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1 and packed.flags.c_contiguous
    assert packed.size == packed_size(codes.size, bits)
    assert not np.shares_memory(packed, codes)
    if expected is None:
        expected = ref_pack(codes.reshape(-1), bits)
    assert packed.tobytes() == expected
    for buf in (packed, expected):
        decoded = unpack(buf, bits, codes.size)
        assert decoded.dtype == np.uint8 and decoded.shape == (codes.size,)
        np.testing.assert_array_equal(decoded, codes.reshape(-1))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 63, 64, 65, 200])
def test_lengths(bits: int, n: int) -> None:
    check_roundtrip(random_codes(np.random.default_rng(n * 10 + bits), n, bits), bits)


@given(
    bits=st.integers(1, 8),
    n=st.integers(0, 700),
    chunk=st.sampled_from([8, 16, 24, 64, 136, bitpack._CHUNK]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=300, deadline=None)
def test_roundtrip_property(bits: int, n: int, chunk: int, seed: int) -> None:
    codes = random_codes(np.random.default_rng(seed), n, bits)
    with chunk_size(chunk):
        check_roundtrip(codes, bits)


@given(bits=st.integers(1, 8), codes=st.lists(st.integers(0, 255), max_size=80))
@settings(max_examples=200, deadline=None)
def test_roundtrip_property_lists(bits: int, codes: list[int]) -> None:
    # Extreme values (all zeros / all ones) come up more often this way.
    arr = np.array([c & ((1 << bits) - 1) for c in codes], dtype=np.uint8)
    with chunk_size(16):
        check_roundtrip(arr, bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_real_chunk_boundaries(bits: int) -> None:
    chunk = bitpack._CHUNK
    rng = np.random.default_rng(bits)
    for n in (chunk - 8, chunk + 3, 2 * chunk + 37):
        codes = random_codes(rng, n, bits)
        check_roundtrip(codes, bits, ref_pack_np(codes, bits).tobytes())


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("chunk", [8, 24, 48])
def test_small_chunk_boundaries(bits: int, chunk: int) -> None:
    rng = np.random.default_rng(chunk + bits)
    with chunk_size(chunk):
        for n in (chunk - 1, chunk, chunk + 1, chunk + 3, 3 * chunk + 5, 5 * chunk):
            check_roundtrip(random_codes(rng, n, bits), bits)


# --- padding ------------------------------------------------------------------


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 9, 13, 31, 1001])
def test_padding_bits_are_zero(bits: int, n: int) -> None:
    # All-ones codes: any stray set bit in the padding would show.
    packed = pack(np.full(n, (1 << bits) - 1, dtype=np.uint8), bits)
    used = (n * bits) % 8 or 8
    assert packed[:-1].tolist() == [0xFF] * (packed.size - 1)
    assert packed[-1] == (1 << used) - 1


@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7])
def test_unpack_ignores_padding_bits(bits: int) -> None:
    codes = random_codes(np.random.default_rng(1), 13, bits)
    packed = pack(codes, bits)
    used = (codes.size * bits) % 8
    assert used, "needs a partial last byte"
    packed[-1] |= 0xFF & ~((1 << used) - 1)
    np.testing.assert_array_equal(unpack(packed, bits, codes.size), codes)


# --- layouts and buffer types -----------------------------------------------


def layouts(rng: np.random.Generator, bits: int) -> list[np.ndarray]:
    base = random_codes(rng, 4 * 6 * 10, bits).reshape(4, 6, 10)
    return [
        base,                       # 3-D C-contiguous
        base.transpose(2, 0, 1),    # permuted axes
        np.asfortranarray(base),    # F-ordered
        base[:, ::2, 1::3],         # strided slices
        base[::-1],                 # negative stride
        base.reshape(-1)[1:],       # 1-D, odd start address
        base.reshape(-1)[3:-2],     # unaligned, odd length
        base.reshape(-1)[::5],      # 1-D strided
        np.array(5 & ((1 << bits) - 1), dtype=np.uint8),  # 0-d
        base[:0],                   # empty, 3-D
    ]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_non_contiguous_and_multidim(bits: int) -> None:
    for codes in layouts(np.random.default_rng(bits), bits):
        flat = np.ascontiguousarray(codes).reshape(-1).copy()
        with chunk_size(16):
            packed = pack(codes, bits)
        assert packed.tobytes() == ref_pack(flat, bits)
        np.testing.assert_array_equal(unpack(packed, bits, flat.size), flat)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unaligned_input_across_chunks(bits: int) -> None:
    big = random_codes(np.random.default_rng(bits), 1001, bits)
    with chunk_size(64):
        check_roundtrip(big[1:], bits)
        check_roundtrip(big[3:-5], bits)


def test_pack_leaves_input_untouched_and_accepts_readonly() -> None:
    codes = random_codes(np.random.default_rng(2), 333, 5)
    codes.setflags(write=False)
    before = codes.copy()
    check_roundtrip(codes, 5)
    np.testing.assert_array_equal(codes, before)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_unpack_buffer_types(bits: int) -> None:
    codes = random_codes(np.random.default_rng(bits), 77, bits)
    raw = ref_pack(codes, bits)
    arr = np.frombuffer(raw, np.uint8)
    strided = np.zeros(2 * len(raw), np.uint8)
    strided[::2] = arr
    for buf in (raw, bytearray(raw), memoryview(raw), arr, arr.copy(), strided[::2]):
        np.testing.assert_array_equal(unpack(buf, bits, codes.size), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_into_out(bits: int) -> None:
    codes = random_codes(np.random.default_rng(bits), 120, bits)
    packed = pack(codes, bits)

    out = np.full(120, 0xAA, np.uint8)
    assert unpack(packed, bits, 120, out=out) is out
    np.testing.assert_array_equal(out, codes)

    out2d = np.zeros((10, 12), np.uint8)  # any shape of the right size, C order
    assert unpack(packed, bits, 120, out=out2d) is out2d
    np.testing.assert_array_equal(out2d.reshape(-1), codes)

    holder = np.zeros((120, 2), np.uint8)  # non-contiguous out
    assert unpack(packed, bits, 120, out=holder[:, 1]) is not None
    np.testing.assert_array_equal(holder[:, 1], codes)
    assert not holder[:, 0].any()

    odd = np.zeros(121, np.uint8)[1:]  # unaligned out
    with chunk_size(16):
        unpack(packed, bits, 120, out=odd)
    np.testing.assert_array_equal(odd, codes)


def test_unpack_out_may_alias_buffer() -> None:
    codes = random_codes(np.random.default_rng(3), 64, 8)
    packed = pack(codes, 8)
    assert unpack(packed, 8, 64, out=packed) is packed
    np.testing.assert_array_equal(packed, codes)
    small = codes & 7
    storage = np.zeros(64, np.uint8)
    storage[:24] = pack(small, 3)
    unpack(storage[:24], 3, 64, out=storage)  # decodes over its own input
    np.testing.assert_array_equal(storage, small)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_bad_bits(bits: int) -> None:
    codes = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(b"\x00", bits, 1)
    with pytest.raises(ValueError, match="bits"):
        packed_size(4, bits)


def test_negative_n() -> None:
    with pytest.raises(ValueError, match="n must be"):
        unpack(b"", 3, -1)
    with pytest.raises(ValueError, match="n must be"):
        packed_size(-1, 3)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("delta", [-1, 1, 5])
def test_wrong_buffer_length(bits: int, delta: int) -> None:
    n = 21
    raw = bytes(packed_size(n, bits) + delta)
    with pytest.raises(ValueError, match="exactly"):
        unpack(raw, bits, n)
    with pytest.raises(ValueError, match="exactly"):
        unpack(np.frombuffer(raw, np.uint8), bits, n)


def test_empty_buffer_for_nonzero_n() -> None:
    with pytest.raises(ValueError, match="exactly"):
        unpack(b"", 4, 1)
    assert unpack(b"", 4, 0).size == 0


@pytest.mark.parametrize(
    "codes",
    [
        np.zeros(4, np.int8),
        np.zeros(4, np.uint16),
        np.zeros(4, np.int64),
        np.zeros(4, np.float32),
        np.zeros(4, bool),
        [0, 1, 2, 3],
        b"\x00\x01",
    ],
    ids=["int8", "uint16", "int64", "float32", "bool", "list", "bytes"],
)
def test_pack_rejects_non_uint8(codes: object) -> None:
    with pytest.raises(TypeError, match="uint8"):
        pack(codes, 4)  # type: ignore[arg-type]


def test_unpack_rejects_bad_buffer_and_out() -> None:
    with pytest.raises(TypeError):
        unpack(np.zeros(2, np.uint16), 4, 4)
    with pytest.raises(TypeError):
        unpack(np.zeros((1, 2), np.uint8), 4, 4)
    with pytest.raises(TypeError):
        unpack([0, 0], 4, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="out"):
        unpack(b"\x00\x00", 4, 4, out=np.zeros(4, np.int8))
    with pytest.raises(ValueError, match="out"):
        unpack(b"\x00\x00", 4, 4, out=np.zeros(5, np.uint8))


@pytest.mark.parametrize("bits", range(2, 8))
def test_pair_fields_are_neighbouring_codes(bits: int) -> None:
    """The fields a table decode gathers by: code[2i] | code[2i+1] << bits, from the
    reference packing, at sizes that fill one lane, several, and a whole workspace."""
    rng = np.random.default_rng(bits)
    ws = bitpack.workspace(4096)
    for m in (8, 16, 24, 1000, 4096):
        codes = rng.integers(0, 1 << bits, m, dtype=np.uint8)
        codes[:8] = (1 << bits) - 1  # all ones: a field must not leak into its neighbour
        packed = np.frombuffer(ref_pack(codes, bits) + b"\xff", np.uint8)  # junk after
        fields = bitpack.pair_fields(packed, bits, m, ws)
        want = codes[0::2].astype(np.uint16) | codes[1::2].astype(np.uint16) << bits
        np.testing.assert_array_equal(fields, want)
        assert fields.dtype == (np.uint8 if bits <= 4 else np.uint16)


def test_pair_fields_refuse_what_they_cannot_split() -> None:
    ws = bitpack.workspace(64)
    src = np.zeros(64, np.uint8)
    for bits, m in ((1, 8), (8, 8), (5, 12), (5, 128)):
        with pytest.raises(ValueError, match="pair fields"):
            bitpack.pair_fields(src, bits, m, ws)
