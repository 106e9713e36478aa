"""Run every benchmark and write docs/BENCHMARKS.md.

    .venv/bin/python bench/run.py            # full run, ~15 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # fewer rounds: a smoke test of the suite

Single-threaded numbers first (OMP/OPENBLAS/MKL thread variables are set to 1
before numpy is imported, in this process and in every child), multi-core
second (one single-threaded process per core, and 2 service workers). If
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set (some machines here set them for
older OpenBLAS builds; they slow a current one), this command re-runs itself
without both and says so in the machine line; threadpoolctl shows which
OpenBLAS kernel then runs.
"""

from __future__ import annotations

import os
import sys

_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _UNSET) and "_FEATCODEC_BENCH_UNSET" not in os.environ:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env["_FEATCODEC_BENCH_UNSET"] = ",".join(f"{v}={os.environ[v]}" for v in _UNSET
                                             if v in os.environ)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads BLAS

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import importlib.util  # noqa: E402


def _load(name: str) -> Any:
    """bench/NAME.py as a module (bench/ is not a package; ``codecs`` shadows the stdlib)."""
    spec = importlib.util.spec_from_file_location(f"featcodec_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    feats = np._core._multiarray_umath.__cpu_features__
    simd = "/".join(f for f in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX") if feats.get(f))
    blas = "BLAS: unknown (install threadpoolctl: featcodec[bench])"
    try:
        import threadpoolctl
        infos = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        if infos:
            i = infos[0]
            blas = (f"BLAS: {i.get('internal_api')} {i.get('version')} "
                    f"(kernel {i.get('architecture')}, {i.get('threading_layer')}, "
                    f"{i.get('num_threads')} thread(s) at run time)")
    except ImportError:
        pass
    unset = os.environ.get("_FEATCODEC_BENCH_UNSET")
    note = f"; unset for this run: {unset}" if unset else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, SIMD {simd or 'baseline'}; "
            f"Linux {platform.release()}; Python {platform.python_version()}; "
            f"numpy {np.__version__}; {blas}{note}")


# ----------------------------------------------------------------------------- formatting


def _f(v: float, nd: int = 2) -> str:
    return f"{v:.{nd}f}"


def _met(v: float, target: float) -> str:
    return "met" if v >= target else "**not met**"


def codec_sections(res: dict[str, Any]) -> list[str]:
    out = ["## Codecs, single thread", "",
           f"Baseline: `np.copyto` of a 64 MiB float32 array into another, "
           f"{_f(res['copy_gbs'])} GB/s (measured each round next to every figure). "
           "Encode is `codec.encode` end to end (validation, range fit, quantize, pack, CRC, "
           "the returned bytes); decode is `codec.decode` end to end (parse, CRC check, "
           "unpack, dequantize). GB/s counts float32 bytes in (encode) or out (decode); "
           "*ratio* is that speed over the copy's, median of per-round ratios. "
           "Data: Laplacian with per-channel scales and ~5 % exact zeros.", "",
           "### Targets (64 MiB, per-tensor, fitted range)", "",
           f"Each row was measured in {res['target_passes']} passes over all rows (11 rounds "
           "each), spread over the codec run between its other sections (they started "
           + ", ".join(f"{t:.0f}" for t in res["target_pass_times"]) + " s into it): the "
           "ratio is the median pass, *spread* the lowest and highest pass. On this shared "
           "machine a whole pass can run 30 % slower or faster than the next, copy included; "
           "within a pass the ratios hold much better.", "",
           "| path | encode GB/s | encode ratio | spread | target | | decode GB/s | decode ratio "
           "| spread | target | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in res["targets"]:  # (the floors follow the table)
        e, d = t["enc"]["enc"], t["dec"]["dec"]
        worst = "" if "/" not in t["label"] else \
            f" (worst: {t['enc']['case'].bits} b encode, {t['dec']['case'].bits} b decode)"
        es, ds = ("–".join(_f(v, 3) for v in t[k]) for k in ("enc_range", "dec_range"))
        out.append(f"| {t['label']}{worst} | {_f(e.gbs)} | {_f(e.ratio, 3)} | {es} | "
                   f"≥ {t['t_enc']} | {_met(e.ratio, t['t_enc'])} | {_f(d.gbs)} | "
                   f"{_f(d.ratio, 3)} | {ds} | ≥ {t['t_dec']} | {_met(d.ratio, t['t_dec'])} |")
    out += ["", "The same decodes into an existing result (`codec.decode(blob, out=array)`, "
            "no new 64 MiB array per call): "
            + "; ".join(f"{r['case'].method} {r['case'].bits} bits {_f(r['dec'].gbs)} GB/s, "
                        f"ratio {_f(r['dec'].ratio)}" for r in res["decode_into"]) + "."]
    out += ["", "### Floors: what every call pays, in the same run", "",
            "Each step below is part of every encode or decode of the 64 MiB tensor, whatever "
            "the kernels do; speed over the copy's, as above (1/ratio = cost in copies). "
            "Decoding 8-bit codes pays a new 64 MiB result plus the CRC of 16 MiB before any "
            "arithmetic: the sum of those two costs bounds its ratio from above.", "",
            "| step | GB/s of the tensor | ratio | cost in copies |", "|---|---|---|---|"]
    for f in res["floors"]:
        t = f["timing"]
        out.append(f"| {f['label']} | {_f(t.gbs)} | {_f(t.ratio)} | {_f(1 / t.ratio)} |")
    for name, rows in res["tables"].items():
        out += ["", f"### All methods, {name}", "",
                "| method | bits | params | bits/elem | encode GB/s | ratio | decode GB/s "
                "| ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["case"]
            out.append(f"| {c.method} | {c.bits} | "
                       f"{'per-channel (axis 1)' if c.axis is not None else 'per-tensor'} | "
                       f"{_f(r['bpe'], 3)} | {_f(r['enc'].gbs)} | {_f(r['enc'].ratio)} | "
                       f"{_f(r['dec'].gbs)} | {_f(r['dec'].ratio)} |")
    out += ["", "### Peak extra memory (tracemalloc), 64 MiB tensor", "",
            "Peak of everything allocated during the call, its result included, over the "
            "size of the float32 tensor encoded or produced (target ≤ 1.5).", "",
            "| method | bits | params | encode | decode |", "|---|---|---|---|---|"]
    for m in res["memory"]:
        c = m["case"]
        out.append(f"| {c.method} | {c.bits} | "
                   f"{'per-channel' if c.axis is not None else 'per-tensor'} | "
                   f"{_f(m['enc'])}× | {_f(m['dec'])}× |")
    out += ["", "### Peers on the same arrays", "",
            "zfp in fixed-rate mode at the codec's bit widths; SZ3 is error-bounded, so it "
            "gets the absolute bound of the linear codec at the same bits (half a step) and "
            "its own rate is shown; featcodec `linear` alongside. Single thread (pysz "
            "with OpenMP off).", ""]
    for name, rows in res["peers"].items():
        out += [f"#### {name}", "",
                "| codec | bits | bits/elem | SNR dB | encode GB/s | ratio | decode GB/s "
                "| ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "missing" in r:
                out.append(f"| {r['name']} | – | – | – | {r['missing']} | | | |")
                continue
            out.append(f"| {r['name']} | {r['bits']} | {_f(r['bpe'], 3)} | {_f(r['snr'], 1)} | "
                       f"{_f(r['enc'].gbs)} | {_f(r['enc'].ratio, 3)} | {_f(r['dec'].gbs)} | "
                       f"{_f(r['dec'].ratio, 3)} |")
        out.append("")
    mc = res["multicore"]
    out += [f"## Codecs, multi-core ({mc['procs']} processes)", "",
            f"The same calls in {mc['procs']} single-threaded processes at once, each on its "
            f"own 64 MiB tensor, against {mc['procs']} simultaneous copies (aggregate GB/s; "
            "ratio as above).", ""]
    if mc["rows"]:
        out += ["| case | copy GB/s (aggregate) | encode GB/s | ratio | decode GB/s | ratio |",
                "|---|---|---|---|---|---|"]
        for r in mc["rows"]:
            out.append(f"| {r['case'].label} | {_f(r['copy_gbs'])} | {_f(r['enc'].gbs)} | "
                       f"{_f(r['enc'].ratio)} | {_f(r['dec'].gbs)} | {_f(r['dec'].ratio)} |")
    else:
        out.append("One CPU: nothing to run.")
    return out


def service_section(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## Service (loopback)", "",
           "`featcodec serve` next to a raw ASGI echo endpoint under the same uvicorn settings "
           "(bench/service.py), measured in the same run. Latency: one client, kept-alive "
           "connection; requests/s: one client per worker. *local* is `codec.encode` / "
           "`codec.decode` of the same tensor in the client process; *overhead* = p50 / "
           "(echo p50 + local), target ≤ 1.3 for /v1/compress of 3.2 MB. Linear, 8 bits, "
           "per-tensor (the defaults). The client shares the 2 cores with the workers.", "",
           "The echo sends the request body back, so its reply is the size of the request, "
           "while the service's is not (compress: 3.2 MB in, 0.8 MB out; decompress the "
           "reverse). The *size-matched echo* (`/echo?size=N`, same request, a reply of the "
           "service's N bytes, alternated with the other two) moves exactly the service's "
           "bytes; *overhead vs matched* = p50 / (matched echo p50 + local) is the service's "
           "own cost, like for like.", "",
           "| endpoint | tensor | workers | p50 ms | p99 ms | req/s | echo p50 ms | echo p99 ms "
           "| echo req/s | local ms | overhead | matched echo p50 ms | overhead vs matched |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = ""
        if r["endpoint"] == "compress" and r["tensor"].startswith("3.2"):
            target = " (met)" if r["overhead"] <= 1.3 else " (**not met**)"
        out.append(f"| /v1/{r['endpoint']} | {r['tensor']} | {r['workers']} | {_f(r['p50'])} | "
                   f"{_f(r['p99'])} | {_f(r['rps'], 1)} | {_f(r['echo_p50'])} | "
                   f"{_f(r['echo_p99'])} | {_f(r['echo_rps'], 1)} | {_f(r['local_ms'])} | "
                   f"{_f(r['overhead'])}{target} | {_f(r['matched_p50'])} | "
                   f"{_f(r['overhead_matched'])} |")
    return out


def qconv_section(repeat: int) -> list[str]:
    proc = subprocess.run([sys.executable, str(HERE / "qconv.py"), "--repeat", str(repeat)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    body = proc.stdout.strip() if proc.returncode == 0 else \
        f"bench/qconv.py failed ({proc.returncode}):\n\n```\n{proc.stderr[-2000:]}\n```"
    return ["## qconv2d (bench/qconv.py)", "",
            "Single thread; float32 numpy convolution (im2col + matmul) and onnxruntime as "
            "baselines; times in ms, ratios as printed by the script.", "", body]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds: a smoke test")
    ap.add_argument("--only", default="codecs,service,qconv",
                    help="comma-separated subset of codecs,service,qconv")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    parts = set(args.only.split(","))
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    log(machine_line())
    doc = ["# Benchmarks", "",
           "Written by `.venv/bin/python bench/run.py` "
           f"({'--quick, ' if args.quick else ''}"
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC). "
           "Every figure is a median over repeated runs after a warm-up; every speed is also "
           "a ratio to a baseline measured in the same run. Shared 2-core machine: absolute "
           "speeds drift with other tenants, the ratios much less.", "",
           f"**Machine:** {machine_line()}", ""]
    if "codecs" in parts:
        res = _load("codecs").run(args.quick, log)
        doc += codec_sections(res) + [""]
    if "service" in parts:
        doc += service_section(_load("service").run(args.quick, log)) + [""]
    if "qconv" in parts:
        log("qconv2d")
        doc += qconv_section(5 if args.quick else 30) + [""]
    Path(args.out).write_text("\n".join(doc))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
