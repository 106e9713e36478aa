"""Lossless prediction on the codes (codec/predict.py): exact inverse modulo 2^bits, the
documented residuals, and the automatic choice on smooth data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import codec
from codec import predict

pytest.importorskip("constriction")


def smooth_field(shape: tuple[int, ...], sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian-filtered white noise over the last two axes (numpy FFT), unit variance."""
    r = np.random.default_rng(seed).standard_normal(shape)
    ky = np.fft.fftfreq(shape[-2])[:, None]
    kx = np.fft.fftfreq(shape[-1])[None, :]
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (kx ** 2 + ky ** 2))
    y = np.fft.ifft2(np.fft.fft2(r) * g).real
    return (y / y.std()).astype(np.float32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(7,), (1, 1), (3, 5), (2, 3, 4, 6), (0, 4), (4, 0, 3)])
@pytest.mark.parametrize("pred", [predict.DELTA, predict.LORENZO])
def test_inverse_is_exact(bits, shape, pred) -> None:
    if len(shape) < predict.min_ndim(pred):
        with pytest.raises(ValueError, match="dimensions"):
            predict.forward(np.zeros(shape, np.uint8), bits, pred)
        return
    rng = np.random.default_rng(bits)
    s = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    t = predict.forward(s, bits, pred)
    assert t.shape == s.shape and t.dtype == np.uint8
    assert not t.size or int(t.max()) < 1 << bits  # residuals mod 2^b still fit in b bits
    assert np.array_equal(predict.inverse(t, bits, pred), s)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_residuals_are_the_documented_formulas(bits) -> None:
    n = 1 << bits
    s = np.random.default_rng(1).integers(0, n, (3, 6, 7)).astype(np.int64)
    pad = np.pad(s, [(0, 0), (1, 0), (1, 0)])  # zeros outside the tensor
    lorenzo = pad[:, 1:, 1:] - pad[:, :-1, 1:] - pad[:, 1:, :-1] + pad[:, :-1, :-1]
    delta = pad[:, 1:, 1:] - pad[:, 1:, :-1]
    for pred, r in [(predict.LORENZO, lorenzo), (predict.DELTA, delta)]:
        got = predict.forward(s.astype(np.uint8), bits, pred)
        assert np.array_equal(got, (r + n // 2) % n)  # centred residual


def test_constant_codes_give_constant_residuals() -> None:
    s = np.full((4, 5), 9, np.uint8)
    t = predict.forward(s, 4, predict.LORENZO)
    assert t[0, 0] == (9 + 8) % 16 and np.all(t.reshape(-1)[1:] == 8)  # residual 0 is N/2


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), pred=st.sampled_from([predict.DELTA, predict.LORENZO]),
       arr=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=4, max_side=9)))
def test_inverse_property(bits, pred, arr) -> None:
    s = arr & np.uint8((1 << bits) - 1)
    assert np.array_equal(predict.inverse(predict.forward(s, bits, pred), bits, pred), s)


def test_lorenzo_is_chosen_on_smooth_feature_maps_and_pays() -> None:
    x = smooth_field((1, 16, 32, 32), 2.0)
    sizes = {p: len(codec.encode(x, "linear", 8, entropy="ans", predictor=p))
             for p in ("none", "delta", "lorenzo")}
    auto = codec.encode(x, "linear", 8, entropy="ans")
    info = codec.inspect(auto)
    assert info["predictor"] == "lorenzo"
    assert len(auto) == sizes["lorenzo"] < sizes["delta"] < sizes["none"]
    assert sizes["lorenzo"] < 0.7 * sizes["none"]
    assert np.array_equal(codec.decode(auto), codec.decode(codec.encode(x, "linear", 8)))


def test_no_predictor_is_chosen_on_white_noise() -> None:
    x = np.random.default_rng(3).standard_normal((8, 32, 32)).astype(np.float32)
    assert codec.inspect(codec.encode(x, "linear", 6, entropy="ans"))["predictor"] == "none"


@pytest.mark.parametrize("method", ["linear", "symmetric", "mulaw", "log", "exp"])
@pytest.mark.parametrize("signed_data", [True, False])
@pytest.mark.parametrize("pred", ["delta", "lorenzo"])
def test_every_method_round_trips_through_a_predictor(method, signed_data, pred) -> None:
    x = smooth_field((2, 3, 24, 24), 1.5, seed=4)
    if not signed_data:
        x = np.maximum(x, 0)
    for bits in (2, 5, 8):
        raw = codec.encode(x, method, bits, axis=1)
        blob = codec.encode(x, method, bits, axis=1, entropy="ans", predictor=pred)
        assert np.array_equal(codec.decode(blob), codec.decode(raw))
        info = codec.inspect(blob)
        assert info.get("predictor", "none") in (pred, "none")
        if "predictor" in info:
            assert info["predictor"] == pred and len(blob) < len(raw)


def test_predictor_needs_enough_dimensions_and_an_entropy_coder() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        codec.encode(np.ones(10, np.float32), "linear", 4, entropy="ans", predictor="lorenzo")
    with pytest.raises(ValueError, match="lossless stage"):
        codec.encode(np.ones((3, 3), np.float32), "linear", 4, predictor="delta")
    with pytest.raises(ValueError, match="predictor must be one of"):
        codec.encode(np.ones((3, 3), np.float32), "linear", 4, entropy="ans", predictor="x")
    # auto on a scalar or 1-D tensor simply skips what does not apply
    for x in (np.float32(2.0), np.arange(50, dtype=np.float32)):
        blob = codec.encode(np.asarray(x), "linear", 4, entropy="ans")
        assert np.array_equal(codec.decode(blob), codec.decode(codec.encode(np.asarray(x),
                                                                              "linear", 4)))
