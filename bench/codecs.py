"""Codec throughput, peak memory and peers, each speed also as a ratio to np.copyto.

Every figure is a median over rounds after a warm-up. Each round times the
baseline (``np.copyto`` of the same 64 MiB float32 array into a preallocated
one) right before the measured call, and the ratio reported is the median of
the per-round ratios, so that drifting load from other tenants hits both alike.
GB/s counts float32 input bytes (encode) or float32 output bytes (decode), 1e9.

Run through ``bench/run.py`` (which writes docs/BENCHMARKS.md); alone:

    .venv/bin/python bench/codecs.py [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: one thread per process

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import codec  # noqa: E402

METHODS = ("linear", "symmetric", "mulaw", "log", "exp")
BITS = (2, 3, 4, 5, 8)
BIG_SHAPE = (1, 256, 256, 256)  # 16 Mi float32 = 64 MiB
TARGET_PASSES = 5
SMALL_SHAPE = (1, 256, 14, 14)  # a typical late feature map, 200 KB
GB = 1e9


def feature_map(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Post-activation-like data: Laplacian with per-channel scales, some exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=shape).astype(np.float32)
    x *= rng.uniform(0.2, 3.0, (1, shape[1]) + (1,) * (len(shape) - 2)).astype(np.float32)
    x[np.abs(x) < 0.05] = 0.0
    return x


@dataclass
class Timing:
    seconds: float  # median time of one call
    ratio: float  # median over rounds of t(copy) / t(call)
    nbytes: int  # float32 bytes moved per call

    @property
    def gbs(self) -> float:
        return self.nbytes / self.seconds / GB


@dataclass
class Baseline:
    src: np.ndarray
    dst: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.dst = np.empty_like(self.src)

    def __call__(self) -> None:
        np.copyto(self.dst, self.src)

    def bandwidth(self, rounds: int = 11) -> float:
        self()
        return self.src.nbytes / statistics.median(_times(self, rounds)) / GB


def _times(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(fn: Callable[[], Any], base: Baseline, nbytes: int, rounds: int,
            warmup: int = 1) -> Timing:
    """Median time of ``fn`` and the median per-round ratio to one baseline copy of 64 MiB,
    scaled to ``nbytes``: ratio = (nbytes / t_fn) / (64 MiB / t_copy)."""
    for _ in range(warmup):
        fn()
        base()
    # A small call repeats within a round so that a round lasts about as long as a copy.
    t_one = min(_times(fn, 3))
    reps = max(1, int(0.01 / max(t_one, 1e-7)))
    ts, ratios = [], []
    for _ in range(rounds):
        (tb,) = _times(base, 1)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t = (time.perf_counter() - t0) / reps
        ts.append(t)
        ratios.append((nbytes / t) / (base.src.nbytes / tb))
    return Timing(statistics.median(ts), statistics.median(ratios), nbytes)


def peak_multiple(fn: Callable[[], Any], nbytes: int) -> float:
    """Peak traced allocation during ``fn`` (its result included) over ``nbytes``."""
    fn()  # caches (code tables, imports) outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return (peak - before) / nbytes


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    method: str
    bits: int
    axis: int | None
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"{self.method} {self.bits}b {'per-channel' if self.axis is not None else 'per-tensor'}{extra}"

    def valid(self) -> bool:
        m = next(m for m in codec.methods() if m["name"] == self.method)
        lo, hi = m["bits"]["signed"]  # Laplacian data is signed
        return lo <= self.bits <= hi


def run_case(case: Case, x: np.ndarray, base: Baseline, rounds: int) -> dict[str, Any]:
    blob = codec.encode(x, case.method, case.bits, case.axis, **case.params)
    enc = measure(lambda: codec.encode(x, case.method, case.bits, case.axis, **case.params),
                  base, x.nbytes, rounds)
    dec = measure(lambda: codec.decode(blob), base, x.nbytes, rounds)
    return {"case": case, "enc": enc, "dec": dec, "bpe": 8 * len(blob) / x.size}


def table_cases(shape: tuple[int, ...]) -> list[Case]:
    cases = [Case(m, b, ax, shape) for m in METHODS for b in BITS for ax in (None, 1)]
    return [c for c in cases if c.valid()]


# Rows of the targets: (label, cases, encode target, decode target).
def target_rows() -> list[tuple[str, list[Case], float, float]]:
    s = BIG_SHAPE
    return [
        ("linear, 8 bits, per-tensor, fitted", [Case("linear", 8, None, s)], 0.35, 0.50),
        ("symmetric, 8 bits, per-tensor, fitted", [Case("symmetric", 8, None, s)], 0.35, 0.50),
        ("linear, 4 bits", [Case("linear", 4, None, s)], 0.33, 0.45),
        ("linear, 3/5/6/7 bits", [Case("linear", b, None, s) for b in (3, 5, 6, 7)],
         0.25, 0.30),
        ("mulaw, 4 bits", [Case("mulaw", 4, None, s)], 0.15, 0.15),
        ("log, 4 bits", [Case("log", 4, None, s)], 0.15, 0.15),
        ("exp, 4 bits", [Case("exp", 4, None, s)], 0.15, 0.15),
    ]


# ----------------------------------------------------------------------------- floors


def floors(x: np.ndarray, base: Baseline, rounds: int) -> list[dict[str, Any]]:
    """Steps every encode or decode of this tensor pays whatever its kernels do, as ratios
    to the copy like the codec figures (GB/s of the 64 MiB float32 tensor): a new 64 MiB
    result (allocated, page-faulted and written once), the CRC32 of a 16 MiB payload
    (8-bit codes) and of an 8 MiB one (4-bit), and the input check's one read of the tensor."""
    import zlib

    from codec.mappings.blocks import checked_range

    payload8 = np.random.default_rng(0).integers(0, 256, x.size, dtype=np.uint8)
    payload4 = payload8[: x.size // 2]
    cases = [
        ("new 64 MiB float32 array, written once (np.empty + fill)",
         lambda: np.empty(x.shape, np.float32).fill(1.0)),
        ("the same into an existing array (fill)", lambda: base.dst.fill(1.0)),
        ("zlib.crc32 of 16 MiB (an 8-bit payload)", lambda: zlib.crc32(payload8)),
        ("zlib.crc32 of 8 MiB (a 4-bit payload)", lambda: zlib.crc32(payload4)),
        ("the input check: min and max in one read (blocks.checked_range)",
         lambda: checked_range(x)),
    ]
    return [{"label": label, "timing": measure(fn, base, x.nbytes, rounds)}
            for label, fn in cases]


# ----------------------------------------------------------------------------- peers


def peers(x: np.ndarray, base: Baseline, rounds: int) -> list[dict[str, Any]]:
    """zfp fixed-rate and SZ3 (absolute bound = half the linear step) at the codec's rates,
    torch.quantize_per_tensor when torch is installed; featcodec linear alongside."""
    rows: list[dict[str, Any]] = []
    x3 = x.reshape(x.shape[1:]) if x.shape[0] == 1 else x  # zfp pads a size-1 axis to 4
    lo, hi = float(x.min()), float(x.max())

    def snr(y: np.ndarray) -> float:
        d = y.astype(np.float64).reshape(-1) - x.reshape(-1)
        xx = x.reshape(-1).astype(np.float64)
        return float(10 * np.log10(np.dot(xx, xx) / max(np.dot(d, d), 1e-300)))

    def add(name: str, bits: int, enc: Callable[[], Any], dec: Callable[[], Any],
            blob_bytes: int, y: np.ndarray) -> None:
        rows.append({"name": name, "bits": bits, "bpe": 8 * blob_bytes / x.size,
                     "snr": snr(y), "enc": measure(enc, base, x.nbytes, rounds),
                     "dec": measure(dec, base, x.nbytes, rounds)})

    try:
        import zfpy
    except ImportError:
        zfpy = None
    try:
        import pysz
    except ImportError:
        pysz = None
    try:
        import torch
    except ImportError:
        torch = None
    for bits in BITS:
        blob = codec.encode(x, "linear", bits)
        add("featcodec linear", bits, lambda b=bits: codec.encode(x, "linear", b),
            lambda bl=blob: codec.decode(bl), len(blob), codec.decode(blob))
        if zfpy is not None:
            zb = zfpy.compress_numpy(x3, rate=bits)
            add("zfp fixed-rate (zfpy)", bits, lambda b=bits: zfpy.compress_numpy(x3, rate=b),
                lambda z=zb: zfpy.decompress_numpy(z), len(zb), zfpy.decompress_numpy(zb))
        if pysz is not None:
            cfg = pysz.szConfig()
            cfg.errorBoundMode = pysz.szErrorBoundMode.ABS
            cfg.absErrorBound = (hi - lo) / ((1 << bits) - 1) / 2
            cfg.openmp = False
            comp, _ = pysz.sz.compress(x3, cfg)
            add("SZ3 abs bound = linear step/2 (pysz)", bits,
                lambda c=cfg: pysz.sz.compress(x3, c),
                lambda cm=comp: pysz.sz.decompress(cm, np.float32, x3.shape),
                comp.size, pysz.sz.decompress(comp, np.float32, x3.shape)[0])
    if torch is not None:
        import warnings
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated",
                                category=UserWarning)
        torch.set_num_threads(1)
        t = torch.from_numpy(x)
        s = (hi - lo) / 255
        z = int(round(-lo / s))
        q = torch.quantize_per_tensor(t, s, z, torch.quint8)
        add("torch.quantize_per_tensor quint8", 8,
            lambda: torch.quantize_per_tensor(t, s, z, torch.quint8),
            lambda: q.dequantize(), x.size, q.dequantize().numpy())
    else:
        rows.append({"name": "torch.quantize_per_tensor", "missing": "torch is not installed"})
    if zfpy is None:
        rows.append({"name": "zfp (zfpy)", "missing": "zfpy is not installed"})
    if pysz is None:
        rows.append({"name": "SZ3 (pysz)", "missing": "pysz is not installed"})
    return rows


# ----------------------------------------------------------------------------- multi-core


def _mc_worker(idx: int, barrier: Any, queue: Any, cases: list[Case], rounds: int) -> None:
    x = feature_map(BIG_SHAPE, seed=idx)
    base = Baseline(x)
    out = []
    for case in cases:
        blob = codec.encode(x, case.method, case.bits, case.axis)
        fns = {"enc": lambda c=case: codec.encode(x, c.method, c.bits, c.axis),
               "dec": lambda b=blob: codec.decode(b)}
        res: dict[str, list[tuple[float, float]]] = {}
        for kind, fn in fns.items():
            fn()
            res[kind] = []
            for _ in range(rounds):
                barrier.wait()
                (tb,) = _times(base, 1)
                barrier.wait()
                (tf,) = _times(fn, 1)
                res[kind].append((tb, tf))
        out.append(res)
    queue.put((idx, out))


def multicore(cases: list[Case], procs: int, rounds: int) -> list[dict[str, Any]]:
    """The same calls in ``procs`` single-threaded processes at once (each on its own 64 MiB
    tensor), against ``procs`` simultaneous copies: aggregate GB/s and its ratio."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    queue = ctx.Queue()
    ps = [ctx.Process(target=_mc_worker, args=(i, barrier, queue, cases, rounds))
          for i in range(procs)]
    for p in ps:
        p.start()
    results = dict(queue.get() for _ in ps)
    for p in ps:
        p.join()
    nbytes = int(np.prod(BIG_SHAPE)) * 4
    rows = []
    for ci, case in enumerate(cases):
        row: dict[str, Any] = {"case": case}
        for kind in ("enc", "dec"):
            per_round = list(zip(*(results[i][ci][kind] for i in range(procs))))
            tb = [max(r[0] for r in rnd) for rnd in per_round]
            tf = [max(r[1] for r in rnd) for rnd in per_round]
            row[kind] = Timing(statistics.median(tf),
                               statistics.median(b / f for b, f in zip(tb, tf)),
                               nbytes * procs)
            row["copy_gbs"] = nbytes * procs / statistics.median(tb) / GB
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    rounds_big = 3 if quick else 7
    rounds_small = 5 if quick else 15
    big = feature_map(BIG_SHAPE)
    small = feature_map(SMALL_SHAPE, seed=1)
    base = Baseline(big)
    out: dict[str, Any] = {"copy_gbs": base.bandwidth()}
    log(f"np.copyto 64 MiB: {out['copy_gbs']:.2f} GB/s")

    out["floors"] = floors(big, base, 3 if quick else 15)
    for f in out["floors"]:
        log(f"floor {f['label']}: {f['timing'].ratio:.2f}")

    # The judged rows: several passes over all of them, spread over the whole codec run
    # (between its other sections), because this machine's speed, and the
    # copy's, drifts over minutes more than within one pass.
    passes = 1 if quick else TARGET_PASSES
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    pass_times: list[float] = []
    t_start = time.perf_counter()

    def target_pass() -> None:
        if len(pass_times) >= passes:
            return
        pass_times.append(time.perf_counter() - t_start)
        for label, cases, _, _ in target_rows():
            runs.setdefault(label, []).append(
                [run_case(c, big, base, 3 if quick else 11) for c in cases])
        log(f"target pass {len(pass_times)}/{passes} done")

    target_pass()
    into = []  # the decode targets again, into an existing result (codec.decode(out=...))
    result = np.empty_like(big)
    for case in (Case("linear", 8, None, BIG_SHAPE), Case("symmetric", 8, None, BIG_SHAPE),
                 Case("linear", 4, None, BIG_SHAPE)):
        blob = codec.encode(big, case.method, case.bits, case.axis)
        into.append({"case": case, "dec": measure(lambda b=blob: codec.decode(b, out=result),
                                                  base, big.nbytes, 3 if quick else 15)})
        log(f"decode into out= {case.label}: {into[-1]['dec'].ratio:.2f}")
    out["decode_into"] = into
    del result

    tables = {}
    for name, x, rounds in (("64 MiB (1x256x256x256)", big, rounds_big),
                            ("1x256x14x14 (200 KB)", small, rounds_small)):
        rows = []
        for case in table_cases(x.shape):
            rows.append(run_case(case, x, base, rounds))
            log(f"{name} {case.label}: enc {rows[-1]['enc'].gbs:.2f} GB/s "
                f"({rows[-1]['enc'].ratio:.2f}), dec {rows[-1]['dec'].gbs:.2f} GB/s "
                f"({rows[-1]['dec'].ratio:.2f})")
        tables[name] = rows
        target_pass()
    out["tables"] = tables

    mem = []
    for case in [Case(m, b, ax, BIG_SHAPE) for m in METHODS for b in (4, 8)
                 for ax in (None, 1)]:
        if not case.valid():
            continue
        blob = codec.encode(big, case.method, case.bits, case.axis)
        mem.append({"case": case,
                    "enc": peak_multiple(lambda c=case: codec.encode(big, c.method, c.bits,
                                                                     c.axis), big.nbytes),
                    "dec": peak_multiple(lambda b=blob: codec.decode(b), big.nbytes)})
        log(f"memory {case.label}: encode {mem[-1]['enc']:.2f}x, decode {mem[-1]['dec']:.2f}x")
    out["memory"] = mem

    out["peers"] = {}
    for name, x, rounds in (("64 MiB (1x256x256x256)", big, rounds_big),
                            ("1x256x14x14 (200 KB)", small, rounds_small)):
        target_pass()
        out["peers"][name] = peers(x, base, max(3, rounds // 2))
        log(f"peers {name}: done")

    while len(pass_times) < passes:
        target_pass()
    targets = []
    for label, _, t_enc, t_dec in target_rows():
        row: dict[str, Any] = {"label": label, "t_enc": t_enc, "t_dec": t_dec}
        for kind in ("enc", "dec"):
            # worst case of the row in each pass, then the median pass and the spread
            worst = [min(results, key=lambda r, k=kind: r[k].ratio) for results in runs[label]]
            worst.sort(key=lambda r, k=kind: r[k].ratio)
            row[kind] = worst[len(worst) // 2]
            row[f"{kind}_range"] = (worst[0][kind].ratio, worst[-1][kind].ratio)
        targets.append(row)
        log(f"target {label}: encode {row['enc']['enc'].ratio:.2f} (>= {t_enc}), "
            f"decode {row['dec']['dec'].ratio:.2f} (>= {t_dec})")
    out["targets"] = targets
    out["target_passes"] = passes
    out["target_pass_times"] = pass_times

    procs = os.cpu_count() or 1
    mc_cases = [Case("linear", 8, None, BIG_SHAPE), Case("symmetric", 8, None, BIG_SHAPE),
                Case("linear", 4, None, BIG_SHAPE), Case("linear", 5, None, BIG_SHAPE),
                Case("mulaw", 4, None, BIG_SHAPE), Case("log", 4, None, BIG_SHAPE),
                Case("exp", 4, None, BIG_SHAPE)]
    del big
    out["multicore"] = {"procs": procs,
                        "rows": multicore(mc_cases, procs, 3 if quick else 5) if procs > 1
                        else []}
    log(f"multi-core ({procs} processes): done")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test)")
    args = ap.parse_args()
    res = run(args.quick)
    print(f"copy {res['copy_gbs']:.2f} GB/s")


if __name__ == "__main__":
    main()
