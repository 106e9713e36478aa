"""The optional lossless stage: prediction + entropy coding of the codes (docs/FORMAT.md).

The coding byte of the fixed header is ``(coder << 4) | predictor``:

- coder 0: raw packed codes (the only coding before this stage existed);
- coder 1, ``ans``: range ANS (rANS) with a zeroth-order model stored in the
  stream, computed by ``constriction``'s ``AnsCoder`` (64-bit state, 32-bit
  words, 24-bit probabilities);
- coder 2, ``zstd``: one Zstandard frame of one byte per code;
- predictor: 0 none, 1 delta along W, 2 Lorenzo over (H, W) (:mod:`codec.predict`).

Both coders are the optional extra ``featcodec[entropy]``; this module imports
them only when a stream uses them, so everything else needs numpy alone.

The coded payload is only used when it is strictly smaller than the packed
codes, ⌈n·b/8⌉ bytes: otherwise the encoder writes a raw stream (coding 0), so
the lossless stage never costs more than the raw stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import predict
from .errors import FormatError, MissingExtraError
from .varint import uleb128

EXTRA = "entropy"
NONE, ANS, ZSTD = 0, 1, 2
CODERS = {"ans": ANS, "zstd": ZSTD}
CODER_NAMES = {NONE: "none", ANS: "ans", ZSTD: "zstd"}
_MODULES = {ANS: "constriction", ZSTD: "zstandard"}

PRECISION = 24  # constriction's default model precision for its 32-bit-word AnsCoder
_TOTAL = 1 << PRECISION
_CHUNK = 1 << 20  # symbols per call into the ANS coder (bounds int32 scratch)
ZSTD_LEVEL = 9
ZSTD_MAX_WINDOW = 1 << 25  # a frame asking for a larger window is refused


# ----------------------------------------------------------------------------- extras


def _import(coder: int) -> Any:
    name = _MODULES[coder]
    try:
        if coder == ANS:
            import constriction
            return constriction
        import zstandard
        return zstandard
    except ImportError:
        raise MissingExtraError(EXTRA, name) from None


def available(coder: int) -> bool:
    """Whether the library behind ``coder`` can be imported here."""
    try:
        _import(coder)
    except MissingExtraError:
        return False
    return True


def coding_byte(coder: int, predictor: int) -> int:
    return (coder << 4) | predictor


def split_coding(coding: int) -> tuple[int, int]:
    return coding >> 4, coding & 0x0F


def check_coding(coding: int, ndim: int) -> None:
    """FormatError unless ``coding`` is a valid coding byte for an ``ndim``-d tensor."""
    coder, pred = split_coding(coding)
    if coder not in CODER_NAMES or pred not in predict.BY_ID:
        raise FormatError(f"unsupported payload coding 0x{coding:02x}")
    if pred and not coder:
        raise FormatError(f"payload coding 0x{coding:02x}: a predictor needs an entropy coder")
    if ndim < predict.min_ndim(pred):
        raise FormatError(f"payload coding 0x{coding:02x}: predictor "
                          f"{predict.BY_ID[pred]} needs ndim >= {predict.min_ndim(pred)}")


# ----------------------------------------------------------------------------- varints


def _uleb(values: np.ndarray) -> bytes:
    return b"".join(uleb128(v) for v in values.tolist())  # at most 256 table entries


def _uleb_len(values: np.ndarray) -> int:
    v = np.asarray(values, np.int64)
    return int(np.sum(1 + (v >= 1 << 7) + (v >= 1 << 14) + (v >= 1 << 21) + (v >= 1 << 28)))


def _read_uleb(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos >= len(buf):
            raise FormatError(f"truncated ANS table: {what}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise FormatError(f"non-minimal varint in the ANS table ({what})")
            return value, pos
    raise FormatError(f"varint in the ANS table ({what}) is longer than 10 bytes")


# ----------------------------------------------------------------------------- the ANS model


def weights(counts: np.ndarray, p: int) -> np.ndarray:
    """The 24-bit model of stored table counts (Σ counts = 2^p): w = counts·2^(24−p), a zero
    count gets weight 1, and the first largest entry pays for those ones, so Σw = 2^24."""
    c = np.asarray(counts, np.int64)
    w = np.where(c > 0, c << (PRECISION - p), 1)
    m = int(np.argmax(c))
    w[m] -= int(np.count_nonzero(c == 0))
    return w


def _quantize_counts(hist: np.ndarray, p: int) -> np.ndarray | None:
    """Counts summing to 2^p with every observed symbol >= 1, or None if impossible."""
    n = int(hist.sum())
    total = 1 << p
    used = hist > 0
    if int(used.sum()) > total:
        return None
    c = (hist.astype(np.float64) * (total / n)).astype(np.int64)
    c = np.where(used, np.maximum(c, 1), 0)
    diff = total - int(c.sum())
    m = int(np.argmax(hist))
    if c[m] + diff < 1:
        return None
    c[m] += diff
    return c


def _ans_cost_bits(hist: np.ndarray, w: np.ndarray) -> float:
    used = hist > 0
    return float(np.sum(hist[used] * (PRECISION - np.log2(w[used].astype(np.float64)))))


def _ans_words_bytes(bits: float) -> int:
    """Bytes of the ANS words for ``bits`` of information: the bulk plus 1-2 state words."""
    return 4 * (int(math.ceil(bits / 32.0)) + 1) if bits > 0 else 0


def plan_table(hist_full: np.ndarray) -> tuple[int, int, int, np.ndarray, int]:
    """Best (lo, hi, p, counts, estimated payload bytes) for a histogram of symbols."""
    nz = np.flatnonzero(hist_full)
    lo, hi = int(nz[0]), int(nz[-1])
    hist = hist_full[lo: hi + 1].astype(np.int64)
    if lo == hi:  # one symbol: the table says it all, no words
        return lo, hi, 0, np.ones(1, np.int64), 4
    best: tuple[int, np.ndarray, int] | None = None
    p_min = max(1, int(math.ceil(math.log2(max(2, int(np.count_nonzero(hist)))))))
    for p in range(p_min, PRECISION + 1):
        c = _quantize_counts(hist, p)
        if c is None:
            continue
        size = 3 + _uleb_len(c) + _ans_words_bytes(_ans_cost_bits(hist, weights(c, p)))
        if best is None or size < best[2]:
            best = (p, c, size)
    assert best is not None
    return lo, hi, best[0], best[1], best[2]


def estimate(symbols: np.ndarray, bits: int) -> int:
    """Estimated ANS payload bytes of ``symbols`` (within a few bytes of the real size)."""
    hist = np.bincount(symbols.reshape(-1), minlength=1 << bits)
    return plan_table(hist)[4]


def _model(constriction: Any, w: np.ndarray) -> Any:
    # Weights w - 1 summing to exactly 2^24 - M make constriction's fixed-point scale exactly
    # 1, so its model is w itself (every symbol gets its +1): see docs/FORMAT.md.
    return constriction.stream.model.Categorical((w - 1).astype(np.float64), perfect=False)


def ans_encode(symbols: np.ndarray, bits: int) -> bytes:
    constriction = _import(ANS)
    flat = symbols.reshape(-1)
    hist = np.bincount(flat, minlength=1 << bits)
    lo, hi, p, counts, _ = plan_table(hist)
    table = bytes([lo, hi, p]) + _uleb(counts)
    if lo == hi:
        return table
    model = _model(constriction, weights(counts, p))
    coder = constriction.stream.stack.AnsCoder()
    n = flat.size
    # A stack: encode the last chunk first so decoding pops the first chunk first.
    for stop in range(n, 0, -_CHUNK):
        start = max(0, stop - _CHUNK)
        coder.encode_reverse(flat[start:stop].astype(np.int32) - lo, model)
    words = np.asarray(coder.get_compressed(), dtype="<u4")
    return table + words.tobytes()


def ans_decode(payload: memoryview, n: int, bits: int) -> np.ndarray:
    if len(payload) < 3:
        raise FormatError("truncated ANS table")
    lo, hi, p = payload[0], payload[1], payload[2]
    if hi < lo or hi >= 1 << bits:
        raise FormatError(f"ANS table symbol range [{lo}, {hi}] is outside the "
                          f"{1 << bits} codes")
    if p > PRECISION:
        raise FormatError(f"ANS table precision {p} exceeds {PRECISION}")
    pos = 3
    counts = np.empty(hi - lo + 1, np.int64)
    for i in range(counts.size):
        counts[i], pos = _read_uleb(payload, pos, "count")
        if counts[i] > 1 << p:
            raise FormatError("ANS table count exceeds the table total")
    if int(counts.sum()) != 1 << p:
        raise FormatError(f"ANS table counts sum to {int(counts.sum())}, not 2^{p}")
    rest = payload[pos:]
    if lo == hi:
        if len(rest):
            raise FormatError("ANS payload of a one-symbol table must end after the table")
        return np.full(n, lo, np.uint8)
    if len(rest) % 4:
        raise FormatError("ANS words are not a whole number of 32-bit words")
    constriction = _import(ANS)
    words = np.frombuffer(rest, dtype="<u4").astype(np.uint32)
    model = _model(constriction, weights(counts, p))
    try:
        coder = constriction.stream.stack.AnsCoder(words)
    except (ValueError, RuntimeError) as exc:
        raise FormatError(f"invalid ANS data: {exc}") from None
    out = np.empty(n, np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        out[start:stop] = coder.decode(model, stop - start) + lo
    if not coder.is_empty():
        raise FormatError("ANS data left over after the last code")
    return out


# ----------------------------------------------------------------------------- zstd


def zstd_encode(symbols: np.ndarray) -> bytes:
    zstandard = _import(ZSTD)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                    write_checksum=False)
    return bytes(cctx.compress(np.ascontiguousarray(symbols).tobytes()))


def zstd_decode(payload: memoryview, n: int, bits: int) -> np.ndarray:
    zstandard = _import(ZSTD)
    data = bytes(payload)
    try:
        frame = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise FormatError(f"invalid zstd frame: {exc}") from None
    # Bound the output by the header's element count *before* decompressing: a frame's own
    # content size is checked, never trusted (with it, zstd ignores max_output_size).
    if frame.content_size not in (n, zstandard.CONTENTSIZE_UNKNOWN):
        raise FormatError(f"zstd frame declares {frame.content_size} bytes, the stream has "
                          f"{n} codes")
    if frame.window_size > ZSTD_MAX_WINDOW:
        raise FormatError(f"zstd frame window {frame.window_size} exceeds {ZSTD_MAX_WINDOW}")
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    try:
        out = dctx.decompress(data, max_output_size=n, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"invalid zstd payload: {exc}") from None
    if len(out) != n:
        raise FormatError(f"zstd payload holds {len(out)} codes, the stream has {n}")
    sym = np.frombuffer(out, np.uint8).copy()  # writable: decoding works in place
    if bits < 8 and sym.size and int(sym.max()) >= 1 << bits:
        raise FormatError(f"zstd payload holds a code >= 2^{bits}")
    return sym


# ----------------------------------------------------------------------------- the stage


def predictor_candidates(predictor: str, ndim: int) -> list[int]:
    if predictor == "auto":
        return [p for p in (predict.NONE, predict.DELTA, predict.LORENZO)
                if ndim >= predict.min_ndim(p)]
    if predictor not in predict.NAMES:
        raise ValueError(f"predictor must be one of {sorted(predict.NAMES) + ['auto']}, "
                         f"got {predictor!r}")
    pid = predict.NAMES[predictor]
    if ndim < predict.min_ndim(pid):
        raise ValueError(f"predictor {predictor!r} needs a tensor with at least "
                         f"{predict.min_ndim(pid)} dimensions, got {ndim}")
    return [pid]


def coder_candidates(entropy: str | None) -> list[int]:
    """Coders to try; [] for none. ``auto`` takes those installed (maybe none)."""
    if entropy is None or entropy == "none":
        return []
    if entropy == "auto":
        return [c for c in (ANS, ZSTD) if available(c)]
    if entropy not in CODERS:
        raise ValueError(f"entropy must be None, 'auto' or one of {sorted(CODERS)}, "
                         f"got {entropy!r}")
    _import(CODERS[entropy])  # MissingExtraError now, not after quantizing
    return [CODERS[entropy]]


def encode(stored: np.ndarray, bits: int, coders: Iterable[int],
           predictors: Iterable[int]) -> tuple[int, bytes] | None:
    """(coding byte, payload) of the smallest lossless stage, or None when the raw packed
    codes are as small (so the caller writes a raw stream)."""
    coders = list(coders)
    n = stored.size
    packed = (n * bits + 7) // 8
    if not coders or n == 0:
        return None
    # The predictor is chosen on the estimated ANS size (a zeroth-order entropy), which
    # ranks predictors for zstd too; only the chosen one is really coded.
    cands = []
    for pid in predictors:
        sym = predict.forward(stored, bits, pid)
        cands.append((estimate(sym, bits), pid, sym))
    cands.sort(key=lambda c: (c[0], c[1]))
    _, pid, sym = cands[0]
    best: tuple[int, bytes] | None = None
    for coder in coders:
        payload = ans_encode(sym, bits) if coder == ANS else zstd_encode(sym)
        if len(payload) < packed and (best is None or len(payload) < len(best[1])):
            best = (coding_byte(coder, pid), payload)
    return best


def decode(coding: int, payload: memoryview, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """The stored codes (uint8, ``shape``) of a coded payload."""
    coder, pid = split_coding(coding)
    n = math.prod(shape)
    if coder == ANS:
        sym = ans_decode(payload, n, bits)
    elif coder == ZSTD:
        sym = zstd_decode(payload, n, bits)
    else:  # pragma: no cover - container.parse refuses these
        raise FormatError(f"unsupported payload coding 0x{coding:02x}")
    return predict.inverse(sym.reshape(shape), bits, pid)
