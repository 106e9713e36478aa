"""8-bit μ-law with μ = 255, r = 1 is torchaudio's ``mu_law_encoding`` /
``mu_law_decoding`` (quantization_channels=256), checked against an independent
numpy float32 re-implementation of those two functions.

The codec rounds exact ties half to even where torchaudio rounds half up, so
inputs within 1e-3 of a tie are left out of the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import codec

MU = np.float32(255.0)  # quantization_channels - 1
TIE_MARGIN = 1e-3
RTOL = 2e-6


def ref_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchaudio.functional.mu_law_encoding in float32: (codes 0..255, pre-rounding value)."""
    x = np.asarray(x, np.float32)
    x_mu = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    t = (x_mu + np.float32(1)) / np.float32(2) * MU
    return np.floor(t + np.float32(0.5)).astype(np.int64), t  # .to(int64) of a value >= 0


def ref_decode_literal(code: np.ndarray) -> np.ndarray:
    """torchaudio.functional.mu_law_decoding, operation for operation, in float32."""
    y = (np.asarray(code).astype(np.float32) / MU) * np.float32(2) - np.float32(1)
    return (np.sign(y) * (np.exp(np.abs(y) * np.log1p(MU)) - np.float32(1)) / MU
            ).astype(np.float32)


def ref_decode(code: np.ndarray) -> np.ndarray:
    """The same formula evaluated to float32 precision.

    Literally, ``code/mu*2 - 1`` and ``exp(.) - 1`` cancel catastrophically near
    0 (up to ~2e-5 relative error at code 128): the numerator 2·code − μ is
    exact in float32 and expm1 is exp(.) − 1 without the cancellation.
    """
    y = (np.float32(2) * np.asarray(code).astype(np.float32) - MU) / MU
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU).astype(np.float32)


def not_near_tie(t: np.ndarray) -> np.ndarray:
    return np.abs(t - np.floor(t) - np.float32(0.5)) > TIE_MARGIN


def codec_roundtrip(x: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray, bytes]:
    blob = codec.encode(x, method="mulaw", bits=8, mu=255, max_abs=1.0, **kw)
    q = codec.decode_qtensor(blob)
    return codec.decode(blob), q.codes.astype(np.int64) + 128, blob


def check_against_reference(x: np.ndarray, **kw) -> None:
    y, codes, blob = codec_roundtrip(x, **kw)
    info = codec.inspect(blob)
    assert info["signed"] is True and info["params"]["mu"] == 255.0
    assert np.all(np.asarray(info["params"]["max_abs"]) == 1.0)
    want_codes, t = ref_encode(x)
    keep = not_near_tie(t)
    # Codes: identical away from ties; at most one apart next to them.
    assert np.array_equal(codes[keep], want_codes[keep])
    assert np.all(np.abs(codes - want_codes) <= 1)
    # Values: torchaudio's decoded level to float32 precision.
    want = ref_decode(want_codes)
    np.testing.assert_allclose(y[keep], want[keep], rtol=RTOL, atol=0)
    # The literal float32 evaluation agrees to its own (worse) precision.
    np.testing.assert_allclose(y[keep], ref_decode_literal(want_codes)[keep], rtol=5e-5, atol=0)


def test_reference_helpers_are_sane() -> None:
    codes, _ = ref_encode(np.array([-1.0, 0.0, 1.0], np.float32))
    assert codes.tolist() == [0, 128, 255]
    levels = ref_decode(np.arange(256))
    assert levels[0] == -1.0 and levels[-1] == 1.0 and np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(levels, ref_decode_literal(np.arange(256)), rtol=5e-5)
    # float64 truth for the level nearest 0
    truth = np.expm1(np.log1p(255.0) / 255.0) / 255.0
    assert abs(levels[128] - truth) <= 4e-7 * truth  # a couple of float32 ulps


def test_dense_sweep_of_minus_one_to_one() -> None:
    x = np.linspace(-1.0, 1.0, 400_001, dtype=np.float32)
    x = np.concatenate([x, [-1.0, -0.0, 0.0, 1.0, 1e-45, -1e-45, 1e-8, -1e-8]]).astype(np.float32)
    _, t = ref_encode(x)
    assert np.mean(~not_near_tie(t)) < 0.01  # the exclusion is small
    check_against_reference(x)


def test_every_level_is_reproduced() -> None:
    # The input that torchaudio maps to the middle of each code's interval.
    k = np.arange(256)
    c = (2.0 * k / 255.0) - 1.0
    x = (np.sign(c) * np.expm1(np.abs(c) * np.log1p(255.0)) / 255.0).astype(np.float32)
    y, codes, _ = codec_roundtrip(x)
    assert codes.tolist() == k.tolist()
    np.testing.assert_allclose(y, ref_decode(k), rtol=RTOL, atol=0)
    assert y[0] == -1.0 and y[-1] == 1.0


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 300),
                    elements=st.floats(-1.0, 1.0, width=32)))
def test_random_inputs(x) -> None:
    x = np.concatenate([x, [np.float32(-0.5)]])  # negative data: the signed variant
    check_against_reference(x)


@settings(max_examples=50, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 100), elements=st.floats(0.0, 1.0, width=32)))
def test_non_negative_input_forced_signed(x) -> None:
    # Non-negative data picks unsigned codes by default; signed=True is torchaudio's grid.
    assert codec.inspect(codec.encode(x, "mulaw", 8, mu=255, max_abs=1.0))["signed"] is False
    check_against_reference(x, signed=True)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_with_the_same_range_is_the_same(axis) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, (8, 300)).astype(np.float32)
    check_against_reference(x, axis=axis)
    a = codec.decode(codec.encode(x, "mulaw", 8, axis=axis, mu=255, max_abs=1.0))
    b = codec.decode(codec.encode(x, "mulaw", 8, mu=255, max_abs=1.0))
    assert np.array_equal(a, b)


def test_out_of_range_saturates_where_torchaudio_overflows() -> None:
    x = np.array([-np.inf, -1e30, -1.5, -1.0, 1.0, 1.5, 1e30, np.inf], np.float32)
    y, codes, _ = codec_roundtrip(x)
    assert codes.tolist() == [0, 0, 0, 0, 255, 255, 255, 255]
    assert y.tolist() == [-1.0] * 4 + [1.0] * 4
