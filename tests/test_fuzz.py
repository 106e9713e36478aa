"""Fuzzing ``codec.decode`` with random, mutated and structurally hostile streams.

The contract checked for every input (docs/SECURITY.md):

1. the only exception that escapes ``codec.decode``/``codec.inspect`` is
   ``codec.FormatError``; both accept or both reject a stream;
2. nothing is allocated in proportion to what a stream *claims*: the peak of
   memory traced by ``tracemalloc`` (numpy reports its buffers to it) stays under
   ``PEAK_FACTOR * max(len(input), output.nbytes) + PEAK_SLACK``.

Why relative to the output too: a *valid* stream may legitimately decode to much
more than its own size (1-bit codes of a float64 tensor are 64x smaller than
the tensor). While decoding, the library holds the unpacked codes (1 byte per
element), the float32 result (4) and, for float16/float64 streams, the cast copy
(2 or 8); per byte of output that is at most (1+4+2)/2 = 3.5 (float16), 1.6
(float64) or 1.25 (float32), hence the factor 4. A rejected stream has no
output, so it may cost at most a few times its own size: a stream claiming
10^12 elements is refused before anything is allocated for them. The slack
covers interpreter objects and the per-channel decoding tables of the at most
16 channels these corpora have (see ``test_per_channel_tables_are_bounded`` for
what happens with many channels).

Budget in CI: 25,000 mutated valid streams and 6,000 random byte strings
(seeded, every one under tracemalloc), 1,500 hypothesis-generated headers with
hostile claims, and 20,000 coverage-guided atheris runs when atheris is
installed: 52,500 inputs in about a minute on two cores.

Longer runs (documented in docs/SECURITY.md):

    FEATCODEC_FUZZ_SCALE=50 FEATCODEC_FUZZ_SEED=$RANDOM pytest tests/test_fuzz.py
    python tests/test_fuzz.py -max_total_time=3600 -rss_limit_mb=4096 CORPUS_DIR

The second is the atheris (libFuzzer) harness below; seed CORPUS_DIR with
``python tests/test_fuzz.py --write-corpus CORPUS_DIR`` first.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--write-corpus" not in sys.argv:
    # The atheris harness: instrument the library for coverage before importing it.
    import atheris

    with atheris.instrument_imports(include=["codec"]):
        import codec
else:
    import codec

import os
import random
import struct
import subprocess
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import peak_memory

ROOT = Path(__file__).resolve().parents[1]
SCALE = max(1, int(os.environ.get("FEATCODEC_FUZZ_SCALE", "1")))
SEED = int(os.environ.get("FEATCODEC_FUZZ_SEED", "20260601"))
MUTATED_INPUTS = 25_000 * SCALE
RANDOM_INPUTS = 6_000 * SCALE
HYPOTHESIS_EXAMPLES = 1_500 * SCALE
ATHERIS_RUNS = 20_000 * SCALE

PEAK_FACTOR = 4
PEAK_SLACK = 256 * 1024
MAX_CHANNELS = 16

MAGIC = b"FCQT"
FIXED = struct.Struct("<4sBBBBBBBB")
MAX_ELEMENTS = 1 << 31  # the library's default limit, which these tests use


# --------------------------------------------------------------------------- corpus


def corpus() -> list[bytes]:
    """Valid streams of every method, signedness, width, dtype, layout and size class."""
    rng = np.random.default_rng(7)
    shapes: list[tuple[tuple[int, ...], int | None]] = [
        ((), None), ((0,), None), ((1,), None), ((7,), None), ((3, 5), 0), ((2, 3, 4), -1),
        ((1, 0, 3), 1), ((4, 1), None), ((16, 512), 0), ((3, 4096), None), ((2, 8, 64), 1),
    ]
    out = []
    for m in codec.methods():
        for shape, axis in shapes:
            for dtype in (np.float16, np.float32, np.float64):
                x = rng.standard_normal(shape).astype(dtype)
                for bits, signed in ((1, None), (3, True), (5, False), (8, None)):
                    kwargs = {} if signed is None else {"signed": signed}
                    try:
                        out.append(codec.encode(x, method=m["name"], bits=bits, axis=axis,
                                                **kwargs))
                    except (TypeError, ValueError):  # e.g. 1-bit signed companders
                        pass
    return out


CORPUS = corpus()
INTERESTING = (0, 1, 2, 0x3F, 0x40, 0x7F, 0x80, 0x81, 0xFE, 0xFF)


class Mutator:
    """Seeded, structure-aware byte mutations; most results get a valid CRC again so they
    reach the checks behind it (parameters, payload, decoding)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def __call__(self, blob: bytes) -> bytes:
        r = self.r
        b = bytearray(blob)
        for _ in range(r.choice((1, 1, 1, 2, 3, 5))):
            op = r.randrange(9)
            if op == 0 and b:  # flip a bit anywhere
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            elif op in (1, 2) and b:  # an interesting byte, mostly in the header
                i = r.randrange(min(len(b), 40)) if op == 1 else r.randrange(len(b))
                b[i] = r.choice(INTERESTING) if r.random() < 0.7 else r.randrange(256)
            elif op == 3:  # insert bytes
                i = r.randrange(len(b) + 1)
                b[i:i] = bytes(r.randrange(256) for _ in range(r.randrange(1, 9)))
            elif op == 4 and b:  # delete a run
                i = r.randrange(len(b))
                del b[i: i + r.randrange(1, 16)]
            elif op == 5:  # truncate
                del b[r.randrange(len(b) + 1):]
            elif op == 6:  # splice with another stream
                other = r.choice(CORPUS)
                i = r.randrange(len(b) + 1)
                b[i:] = other[r.randrange(len(other) + 1):]
            elif op == 7 and len(b) > 12:  # a long varint where a shape begins
                i = r.randrange(12, min(len(b), 24))
                b[i:i + 1] = bytes([0x80 | r.randrange(128)] * r.randrange(1, 12)) + b"\x01"
            elif op == 8 and len(b) >= 8:  # overwrite a 32-bit word (a parameter, a length)
                i = r.randrange(len(b) - 3)
                word = r.choice((0, 1, 0x7F800000, 0x7FC00000, 0xFF800000, 0x80000000,
                                 0xFFFFFFFF, r.getrandbits(32)))
                b[i:i + 4] = word.to_bytes(4, "little")
        if len(b) >= 4 and r.random() < 0.7:
            b[-4:] = zlib.crc32(b[:-4]).to_bytes(4, "little")
        return bytes(b)


# --------------------------------------------------------------------------- the oracle


class Stats:
    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0


def _show(blob: bytes) -> str:
    text = blob[:512].hex()
    return text + ("..." if len(blob) > 512 else "") + f" ({len(blob)} bytes)"


def check(blob: bytes, stats: Stats | None = None, trace: bool = True) -> None:
    """Decode ``blob`` under the contract of the module docstring."""
    out_bytes = 0
    if trace:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    try:
        with warnings.catch_warnings():
            # Out-of-range (but finite, hence valid) parameters overflow to inf while
            # decoding; numpy warns about that. Not an error of this contract.
            warnings.simplefilter("ignore", RuntimeWarning)
            y = codec.decode(blob)
        out_bytes = y.nbytes
        accepted = True
    except codec.FormatError:
        accepted = False
    except Exception as exc:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"decode raised {type(exc).__name__}: {exc}\n"
                             f"input: {_show(blob)}") from exc
    if trace:
        peak = tracemalloc.get_traced_memory()[1] - base
        bound = PEAK_FACTOR * max(len(blob), out_bytes) + PEAK_SLACK
        assert peak <= bound, (f"decode allocated {peak} bytes at its peak for an input of "
                               f"{len(blob)} bytes and an output of {out_bytes} (bound "
                               f"{bound})\ninput: {_show(blob)}")
    try:
        info = codec.inspect(blob)
        inspected = True
    except codec.FormatError:
        inspected = False
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"inspect raised {type(exc).__name__}: {exc}\n"
                             f"input: {_show(blob)}") from exc
    assert inspected == accepted, f"decode and inspect disagree on {_show(blob)}"
    if accepted:
        assert list(y.shape) == info["shape"] and y.dtype.name == info["dtype"]
        assert out_bytes == info["original_bytes"]
    if stats is not None:
        if accepted:
            stats.accepted += 1
        else:
            stats.rejected += 1


@pytest.fixture()
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- seeded loops


def test_corpus_decodes() -> None:
    assert len(CORPUS) > 400
    for blob in CORPUS:
        check(blob, trace=False)


def test_mutated_streams(traced: None) -> None:
    mutate, stats = Mutator(SEED), Stats()
    for _ in range(MUTATED_INPUTS):
        check(mutate(mutate.r.choice(CORPUS)), stats)
    assert stats.accepted + stats.rejected == MUTATED_INPUTS
    # The mutations must reach past the header checks, not only be refused by them.
    assert stats.accepted > MUTATED_INPUTS // 100, vars(stats)
    print(f"mutated streams: {vars(stats)}")


def test_random_bytes(traced: None) -> None:
    r, stats = random.Random(SEED + 1), Stats()
    header = FIXED.pack(MAGIC, 1, 1, 0, 0, 2, 8, 1, 0xFF)
    for i in range(RANDOM_INPUTS):
        n = r.choice((0, 1, 4, 11, 12, 16, 31, 64, 200, 1000))
        body = bytes(r.getrandbits(8) for _ in range(n))
        # a third plain noise, a third behind a good magic, a third behind a good header
        blob = body if i % 3 == 0 else MAGIC + body if i % 3 == 1 else header + body
        check(blob, stats)
    assert stats.accepted + stats.rejected == RANDOM_INPUTS


# --------------------------------------------------------------------------- hostile claims


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _stream(method: int, flags: int, dtype: int, bits: int, shape: tuple[int, ...],
            axis: int, params: bytes, payload_len: int, payload: bytes,
            crc: bool = True) -> bytes:
    body = (FIXED.pack(MAGIC, 1, method, flags, 0, dtype, bits, len(shape), axis)
            + b"".join(_varint(d) for d in shape) + params + _varint(payload_len) + payload)
    return body + (zlib.crc32(body).to_bytes(4, "little") if crc else b"\0\0\0\0")


@pytest.mark.parametrize("shape", [(10**6, 10**6), (10**12,), (2**31 - 1, 2**31 - 1),
                                   (2**63,), (1, 1, 10**12), (0, 10**12)],
                         ids=["1e6x1e6", "1e12", "int31-squared", "2^63", "1x1x1e12",
                              "0x1e12"])
def test_huge_shape_is_refused_at_once(shape: tuple[int, ...]) -> None:
    """A stream claiming 10^12 elements costs nothing but its own parse."""
    payload_len = (min(10**12 * 8, 2**62)) if shape[0] else 0
    blob = _stream(1, 0, 3, 8, shape, 0xFF, b"\0\0\x80\x3f\0\0", payload_len, b"\0" * 64)
    peak, error = peak_memory(codec.decode, blob)
    assert isinstance(error, codec.FormatError), error
    assert peak < 64 * 1024, peak
    peak, error = peak_memory(codec.inspect, blob)
    assert isinstance(error, codec.FormatError), error
    assert peak < 64 * 1024, peak


def test_claims_within_a_raised_limit_still_need_their_bytes() -> None:
    """Even where the caller allows 10^12 elements, a stream that claims them without
    carrying them is refused before any allocation."""
    n = 10**12
    blob = _stream(1, 0, 2, 8, (n,), 0xFF, b"\0\0\x80\x3f\0\0", n, b"\0" * 100)
    peak, error = peak_memory(codec.decode, blob, 10**13)
    assert isinstance(error, codec.FormatError) and "truncated" in str(error), error
    assert peak < 64 * 1024, peak
    # per-channel parameters claimed for 10^9 channels, none sent
    blob = _stream(3, 0, 2, 8, (10**9, 1), 0, b"\0\0\x80\x3f", 10**9, b"")
    peak, error = peak_memory(codec.decode, blob, 10**13)
    assert isinstance(error, codec.FormatError), error
    assert peak < 64 * 1024, peak


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the atheris harness does not need it
    given = None

if given is not None:
    _DIM = st.one_of(st.integers(0, 9), st.sampled_from([2**31 - 1, 2**31, 2**32, 10**12,
                                                          2**63, 2**70]))

    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=st.integers(0, 6), flags=st.sampled_from([0, 1, 2, 3, 4, 0x80]),
           dtype=st.integers(0, 4), bits=st.integers(0, 9),
           shape=st.lists(_DIM, max_size=4), axis=st.sampled_from([0, 1, 3, 0xFF]),
           params=st.binary(max_size=4 * MAX_CHANNELS * 2), payload_len=st.one_of(
               st.integers(0, 64), st.sampled_from([2**31, 2**40, 2**63, 2**69])),
           payload=st.binary(max_size=64), crc=st.booleans(),
           tail=st.sampled_from([b"", b"\0", b"FCQT"]))
    def test_structured_hostile_headers(method: int, flags: int, dtype: int, bits: int,
                                        shape: list[int], axis: int, params: bytes,
                                        payload_len: int, payload: bytes, crc: bool,
                                        tail: bytes) -> None:
        blob = _stream(method, flags, dtype, bits, tuple(shape), axis, params, payload_len,
                       payload, crc) + tail
        tracemalloc.start()
        try:
            check(blob)
        finally:
            tracemalloc.stop()


# --------------------------------------------------------------------------- known limits


@pytest.mark.parametrize("method", ["mulaw", "log", "exp"])
def test_per_channel_tables_are_bounded(method: str) -> None:
    x = np.zeros((20_000, 0), np.float32)  # valid and empty: 20,000 channels, no elements
    blob = codec.encode(x, method=method, bits=8, axis=0)
    peak, error = peak_memory(codec.decode, blob)
    assert error is None
    assert peak <= PEAK_FACTOR * len(blob) + PEAK_SLACK, (peak, len(blob))


# --------------------------------------------------------------------------- atheris


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(CORPUS):
        if len(blob) <= 4096:
            (directory / f"seed-{i:04d}.fcqt").write_bytes(blob)


def test_atheris(tmp_path: Path) -> None:
    """Coverage-guided fuzzing (libFuzzer via atheris) from the corpus, bounded in runs."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    seeds = tmp_path / "corpus"
    write_corpus(seeds)
    work = tmp_path / "new"
    work.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), f"-runs={ATHERIS_RUNS}",
           f"-seed={SEED % 2**31}", "-max_len=4096", "-rss_limit_mb=2048", "-timeout=20",
           f"-artifact_prefix={tmp_path}/", str(work), str(seeds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    tail = proc.stderr[-6000:]
    assert proc.returncode == 0, f"atheris found a failing input:\n{tail}"
    assert f"Done {ATHERIS_RUNS} runs" in proc.stderr, tail
    print(tail.splitlines()[-1])


def _atheris_main() -> None:
    tracemalloc.start()

    def one_input(data: bytes) -> None:
        check(data, trace=True)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    if "--write-corpus" in sys.argv:
        write_corpus(Path(sys.argv[sys.argv.index("--write-corpus") + 1]))
    else:
        _atheris_main()
