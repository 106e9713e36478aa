"""Load test: many concurrent clients against a `featcodec serve` it starts itself.

Starts the service on a free loopback port (a subprocess, `featcodec serve`), then
runs CLIENTS asyncio clients (httpx) for DURATION seconds, each sending a mix of
compress (.npy and MessagePack), decompress (.npy and MessagePack answers) and
inspect requests and, when the service has them, conv2d requests (inline weights,
and a layer registered once at start), back to back, and checks every answer
(compress output byte for byte against the local `codec.encode`, conv answers as
decodable bitstreams). Meanwhile it samples the resident memory (VmRSS in /proc)
of the server and of its worker processes every second.

Reports requests, failures, throughput, latency percentiles per operation, and the
RSS in the first and the last 10 seconds. Exits 1 if any request failed or (unless
--no-rss-check) the mean RSS of the last 10 s exceeds that of the first 10 s by more
than 10%. Loopback only; bounded in time. Run from the repo root:

    .venv/bin/python bench/load.py                       # 64 clients, 60 s
    .venv/bin/python bench/load.py --clients 16 --duration 20 --workers 2 --api-key k
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import codec  # noqa: E402
from conftest import Server  # noqa: E402  (tests/conftest.py: a `featcodec serve` process)

WINDOW_S = 10.0
RSS_GROWTH_LIMIT = 0.10


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def mp(x: np.ndarray) -> bytes:
    return msgpack.packb({"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tobytes()},
                         use_bin_type=True)


@dataclass
class Op:
    name: str
    path: str
    content: bytes
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    expect: bytes | None = None  # exact answer body, when known
    stream: bool = False  # the answer must be a featcodec bitstream


LAYER = "loadtest-conv"


def conv_ops(rng: np.random.Generator) -> tuple[bytes, list[Op]]:
    """A 3x3 convolution 16 -> 32 channels on 28x28 activations; the layer's PUT body."""
    x = np.maximum(rng.standard_normal((1, 16, 28, 28)), 0).astype(np.float32)
    w = (0.1 * rng.standard_normal((32, 16, 3, 3))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(32)).astype(np.float32)
    blob = codec.encode(x, method="linear", bits=8)

    def t(a: np.ndarray) -> dict[str, Any]:
        return {"dtype": "float32", "shape": list(a.shape), "data": a.tobytes()}

    attrs = {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    inline = msgpack.packb({"x": blob, "w": t(w), "bias": t(bias), **attrs, "relu": True,
                            "out_scale": 0.05, "out_zero_point": 0}, use_bin_type=True)
    layer = msgpack.packb({"w": t(w), "bias": t(bias), **attrs}, use_bin_type=True)
    return layer, [
        Op("conv2d-inline", "/v1/conv2d", inline, {"Content-Type": "application/msgpack"},
           stream=True),
        Op("conv2d-layer", f"/v1/layers/{LAYER}/conv2d", blob,
           {"Content-Type": "application/octet-stream"},
           {"relu": "true", "out_scale": "0.05", "out_zero_point": "0"}, stream=True),
    ]


def workload(seed: int = 0) -> list[Op]:
    """Feature-map-sized tensors (50 KB to 800 KB) and their streams."""
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal((1, 64, 28, 28)).astype(np.float32),
               rng.standard_normal((1, 16, 56, 56)).astype(np.float32),
               rng.standard_normal((4, 32, 14, 14)).astype(np.float16),
               np.maximum(rng.standard_normal((1, 128, 14, 14)), 0).astype(np.float32)]
    ops = []
    for i, x in enumerate(tensors):
        method, bits, axis = [("linear", 8, None), ("mulaw", 4, 1), ("log", 5, None),
                              ("exp", 3, 1)][i]
        params = {"method": method, "bits": str(bits)}
        if axis is not None:
            params["axis"] = str(axis)
        blob = codec.encode(x, method=method, bits=bits, axis=axis)
        ops += [
            Op("compress-npy", "/v1/compress", npy(x), {"Content-Type": "application/x-npy"},
               params, blob),
            Op("compress-msgpack", "/v1/compress", mp(x),
               {"Content-Type": "application/msgpack"}, params, blob),
            Op("decompress-npy", "/v1/decompress", blob,
               {"Content-Type": "application/octet-stream"}, {}, npy(codec.decode(blob))),
            Op("decompress-msgpack", "/v1/decompress", blob,
               {"Content-Type": "application/octet-stream", "Accept": "application/msgpack"}),
            Op("inspect", "/v1/inspect", blob, {"Content-Type": "application/octet-stream"}),
        ]
    return ops


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def tree_rss(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in bytes."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return total


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    bytes_out: int = 0
    bytes_in: int = 0


def check(op: Op, r: httpx.Response) -> str | None:
    if r.status_code != 200:
        return f"{op.name}: HTTP {r.status_code} {r.text[:200]}"
    if op.expect is not None and r.content != op.expect:
        return f"{op.name}: unexpected answer ({len(r.content)} bytes)"
    if op.stream:
        try:
            codec.inspect(r.content)
        except (TypeError, ValueError) as exc:
            return f"{op.name}: the answer is not a bitstream: {exc}"
    return None


async def client(c: httpx.AsyncClient, ops: list[Op], deadline: float, res: Results,
                 rng: random.Random) -> None:
    while time.monotonic() < deadline:
        op = rng.choice(ops)
        start = time.perf_counter()
        try:
            r = await c.post(op.path, content=op.content, headers=op.headers, params=op.params)
            problem = check(op, r)
        except httpx.HTTPError as exc:
            problem = f"{op.name}: {type(exc).__name__}: {exc}"
            r = None
        res.latencies.setdefault(op.name, []).append(time.perf_counter() - start)
        res.bytes_out += len(op.content)
        if r is not None:
            res.bytes_in += len(r.content)
        if problem:
            res.failures.append(problem)


async def sample_rss(pid: int, t0: float, deadline: float,
                     samples: list[tuple[float, int]]) -> None:
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - t0, tree_rss(pid)))
        await asyncio.sleep(1.0)
    samples.append((time.monotonic() - t0, tree_rss(pid)))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def run(url: str, pid: int, clients: int, duration: float, api_key: str | None,
              seed: int) -> dict[str, Any]:
    ops = workload(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    res, samples = Results(), []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=60) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
        if "/v1/conv2d" in paths and "/v1/layers/{name}/conv2d" in paths:
            layer, extra = conv_ops(np.random.default_rng(seed + 1))
            r = await c.put(f"/v1/layers/{LAYER}", content=layer,
                            headers={"Content-Type": "application/msgpack"})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"cannot register the conv layer: {r.status_code} {r.text}")
            ops += extra * 3  # about a quarter of the requests
        unauthorized = None
        if api_key:
            probe = await c.post("/v1/inspect", content=ops[2].content,
                                 headers={"Authorization": "Bearer not-the-key"})
            unauthorized = probe.status_code
        for op in ops:  # warm up and validate the workload once
            problem = check(op, await c.post(op.path, content=op.content, headers=op.headers,
                                             params=op.params))
            if problem:
                raise RuntimeError(f"warm-up failed: {problem}")
        t0 = time.monotonic()
        deadline = t0 + duration
        rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
        sampler = asyncio.create_task(sample_rss(pid, t0, deadline, samples))
        await asyncio.gather(*(client(c, ops, deadline, res, rng) for rng in rngs))
        elapsed = time.monotonic() - t0
        await sampler
    every = [v for vs in res.latencies.values() for v in vs]
    first = [r for t, r in samples if t < WINDOW_S]
    last = [r for t, r in samples if t >= max(duration - WINDOW_S, 0)]
    rss_first, rss_last = statistics.mean(first), statistics.mean(last)
    return {
        "clients": clients, "duration_s": round(elapsed, 2),
        "operations": sorted(res.latencies),
        "conv2d_endpoint": any(name.startswith("conv2d") for name in res.latencies),
        "requests": len(every), "failed": len(res.failures),
        "failures_sample": res.failures[:10],
        "throughput_rps": round(len(every) / elapsed, 1),
        "upload_mb_s": round(res.bytes_out / elapsed / 1e6, 1),
        "download_mb_s": round(res.bytes_in / elapsed / 1e6, 1),
        "latency_ms": {name: {"n": len(v), "p50": round(1e3 * pct(v, .5), 1),
                              "p99": round(1e3 * pct(v, .99), 1),
                              "max": round(1e3 * max(v), 1)}
                       for name, v in sorted({**res.latencies, "all": every}.items())},
        "rss_mb": {"first_10s": round(rss_first / 2**20, 1),
                   "last_10s": round(rss_last / 2**20, 1),
                   "peak": round(max(r for _, r in samples) / 2**20, 1),
                   "growth_pct": round(100 * (rss_last / rss_first - 1), 1)},
        "unauthorized_probe": unauthorized,
    }


def print_report(rep: dict[str, Any]) -> None:
    print(f"featcodec load: {rep['clients']} clients for {rep['duration_s']} s, "
          f"operations {', '.join(rep['operations'])}"
          + ("" if rep["conv2d_endpoint"] else " (no /v1/conv2d on this server)"))
    print(f"requests {rep['requests']}, failed {rep['failed']}, "
          f"{rep['throughput_rps']} req/s, up {rep['upload_mb_s']} MB/s, "
          f"down {rep['download_mb_s']} MB/s")
    print(f"{'operation':<20} {'n':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, s in rep["latency_ms"].items():
        print(f"{name:<20} {s['n']:>7} {s['p50']:>8} {s['p99']:>8} {s['max']:>8}")
    m = rep["rss_mb"]
    print(f"server RSS (with workers): first 10 s {m['first_10s']} MiB, last 10 s "
          f"{m['last_10s']} MiB ({m['growth_pct']:+.1f}%), peak {m['peak']} MiB")
    if rep["unauthorized_probe"] is not None:
        print(f"request with a wrong key: HTTP {rep['unauthorized_probe']}")
    for f in rep["failures_sample"]:
        print("FAILED:", f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds (at most 600)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--api-key", help="start the server with this key and send it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--no-rss-check", action="store_true",
                   help="do not fail on RSS growth (short runs)")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 < args.clients <= 1024:
        p.error("--duration must be in (0, 600] and --clients in (0, 1024]")
    log = Path(tempfile.mkstemp(prefix="featcodec-load-", suffix=".log")[1])
    layers_dir = tempfile.mkdtemp(prefix="featcodec-load-layers-")
    env = {"FEATCODEC_LAYERS_DIR": layers_dir,
           "FEATCODEC_OPEN_LAYER_WRITES": "true"}  # without a key: for the one PUT
    if args.api_key:
        env["FEATCODEC_API_KEYS"] = args.api_key
    server = Server(args.workers, log_level="warning", ready_path="/readyz", log=log, **env)
    try:
        server.wait_ready()
        rep = asyncio.run(run(server.url, server.proc.pid, args.clients, args.duration,
                              args.api_key, args.seed))
    finally:
        code = server.stop(timeout=60)
        shutil.rmtree(layers_dir, ignore_errors=True)
    rep["server_exit_code"] = code
    print_report(rep)
    print(f"server exit code after SIGTERM: {code}; log {log}")
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    ok = rep["failed"] == 0 and code == 0
    if not args.no_rss_check and rep["rss_mb"]["growth_pct"] > 100 * RSS_GROWTH_LIMIT:
        print(f"FAIL: RSS grew by more than {100 * RSS_GROWTH_LIMIT:.0f}%")
        ok = False
    if args.api_key and rep["unauthorized_probe"] != 401:
        print("FAIL: a wrong key was not refused with 401")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
