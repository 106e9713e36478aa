"""Service round trips over loopback next to a raw echo endpoint, 1 and 2 workers.

The service runs as ``featcodec serve`` (uvicorn, the app's own settings) and
the echo as a bare ASGI app (below, no framework) under the same uvicorn
settings (protocol class, keep-alive, log level, worker count) on another
port: the echo's round trip is the floor of the transport. Each request sends
the same body to both. Latency is one client with a kept-alive connection to
each, alternating service and echo request by request,
requests/s is one client per worker for a fixed time, and the local codec time
is ``codec.encode``/``codec.decode`` of the same tensor in this process
(single-threaded), so ``p50 / (echo p50 + local)`` is the service's own
overhead (parsing, .npy framing, thread hand-offs, the response).

Loopback traffic only (127.0.0.1), bounded in count and time. Run through
bench/run.py, or alone: ``.venv/bin/python bench/service.py [--quick]``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import codec  # noqa: E402

HOST = "127.0.0.1"
TENSORS = {"3.2 MB (1x256x56x56)": (1, 256, 56, 56), "200 KB (1x128x20x20)": (1, 128, 20, 20)}


async def echo_app(scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
    """The raw echo endpoint: the request body back as application/octet-stream; with
    ``?size=N``, N bytes (the body cut or zero-padded), so that its transfer matches a
    service response of N bytes."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = b"".join(chunks)
    query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&")
                 if "=" in p)
    if "size" in query:
        size = int(query["size"])
        body = body[:size] + bytes(max(0, size - len(body)))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_up(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start within {timeout} s")


@contextmanager
def server(kind: str, workers: int):
    """``featcodec serve`` or the echo app, under the same uvicorn settings."""
    port = _free_port()
    env = dict(os.environ, FEATCODEC_API_KEYS="", PYTHONPATH=str(ROOT))
    if kind == "service":
        cmd = [str(Path(sys.executable).parent / "featcodec"), "serve", "--host", HOST,
               "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    else:
        code = (
            "import uvicorn\n"
            "from app.limits import GuardedHttpToolsProtocol\n"
            "from app.settings import Settings\n"
            "s = Settings()\n"
            f"uvicorn.run('service:echo_app', app_dir={str(ROOT / 'bench')!r}, host={HOST!r},"
            f" port={port}, workers={workers}, log_level='warning',"
            " http=GuardedHttpToolsProtocol, timeout_keep_alive=s.keep_alive_s,"
            " timeout_graceful_shutdown=s.graceful_timeout_s, lifespan='on')\n")
        cmd = [sys.executable, "-c", code]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_up(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(conn: http.client.HTTPConnection, path: str, body: bytes,
             ctype: str) -> bytes:
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"POST {path}: {resp.status} {data[:200]!r}")
    return data


def _connect(port: int) -> http.client.HTTPConnection:
    """A kept-alive connection with Nagle off (no 40 ms delayed-ACK stalls on our side)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def latency(port: int, path: str, body: bytes, ctype: str, n: int, warmup: int = 5
            ) -> list[float]:
    conn = _connect(port)
    try:
        for _ in range(warmup):
            _request(conn, path, body, ctype)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            _request(conn, path, body, ctype)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        conn.close()


def latency_alternated(targets: list[tuple[int, str]], body: bytes, ctype: str, n: int,
                       warmup: int = 5) -> list[list[float]]:
    """Round trips to each (port, path), alternated request by request (same drift for all)."""
    conns = [_connect(port) for port, _ in targets]
    paths = [path for _, path in targets]
    try:
        for _ in range(warmup):
            for c, p in zip(conns, paths):
                _request(c, p, body, ctype)
        out: list[list[float]] = [[] for _ in targets]
        for _ in range(n):
            for c, p, ts in zip(conns, paths, out):
                t0 = time.perf_counter()
                _request(c, p, body, ctype)
                ts.append(time.perf_counter() - t0)
        return out
    finally:
        for c in conns:
            c.close()


def throughput(port: int, path: str, body: bytes, ctype: str, clients: int,
               seconds: float) -> float:
    """Completed requests per second with ``clients`` concurrent kept-alive connections."""
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        conn = _connect(port)
        try:
            _request(conn, path, body, ctype)  # connect + warm
            while time.perf_counter() < stop:
                _request(conn, path, body, ctype)
                counts[i] += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _pct(ts: list[float], q: float) -> float:
    return float(np.percentile(ts, q)) * 1e3


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _local_ms(fn: Callable[[], Any], n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run(quick: bool = False, log: Callable[[str], None] = print,
        workers_list: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    payloads = {}
    for name, shape in TENSORS.items():
        x = rng.laplace(size=shape).astype(np.float32)
        blob = codec.encode(x)
        payloads[name] = {
            "compress": ("/v1/compress", _npy(x), "application/x-npy",
                         _local_ms(lambda x=x: codec.encode(x), 31)),
            "decompress": ("/v1/decompress", blob, "application/octet-stream",
                           _local_ms(lambda b=blob: codec.decode(b), 31)),
        }
    n_big, n_small = (30, 100) if quick else (150, 400)
    seconds = 2.0 if quick else 5.0
    for workers in workers_list:
        with server("service", workers) as sport, server("echo", workers) as eport:
            for name, eps in payloads.items():
                n = n_big if name.startswith("3.2") else n_small
                for ep, (path, body, ctype, local) in eps.items():
                    conn = _connect(sport)
                    try:
                        resp_bytes = len(_request(conn, path, body, ctype))
                    finally:
                        conn.close()
                    matched = f"/echo?size={resp_bytes}"
                    svc, echo, echo_m = latency_alternated(
                        [(sport, path), (eport, "/echo"), (eport, matched)], body, ctype, n)
                    svc_rps = throughput(sport, path, body, ctype, workers, seconds)
                    echo_rps = throughput(eport, "/echo", body, ctype, workers, seconds)
                    row = {"endpoint": ep, "tensor": name, "workers": workers,
                           "body_bytes": len(body), "response_bytes": resp_bytes,
                           "p50": _pct(svc, 50), "p99": _pct(svc, 99), "rps": svc_rps,
                           "echo_p50": _pct(echo, 50), "echo_p99": _pct(echo, 99),
                           "echo_rps": echo_rps, "local_ms": local,
                           "matched_p50": _pct(echo_m, 50)}
                    row["overhead"] = row["p50"] / (row["echo_p50"] + local)
                    row["overhead_matched"] = row["p50"] / (row["matched_p50"] + local)
                    rows.append(row)
                    log(f"{ep} {name} x{workers}: p50 {row['p50']:.2f} ms, echo "
                        f"{row['echo_p50']:.2f} ms + local {local:.2f} ms -> "
                        f"{row['overhead']:.2f}x (size-matched echo {row['matched_p50']:.2f} ms "
                        f"-> {row['overhead_matched']:.2f}x); {svc_rps:.1f} req/s "
                        f"(echo {echo_rps:.1f})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    run(args.quick)


if __name__ == "__main__":
    main()
