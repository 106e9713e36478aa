"""Memory and throughput of a real `featcodec serve` under concurrent compress requests.

For each concurrency level C this starts a fresh `featcodec serve` (so the
kernel's peak-RSS counter VmHWM starts clean), sends one warm-up request, then
keeps C client threads each posting the same `.npy` tensor to /v1/compress for
a fixed number of rounds, and reports:

- idle RSS of the worker after start-up and one warm-up request,
- peak RSS (VmHWM) of the worker over the run, and the growth over idle per
  concurrent request,
- requests per second and median / p95 latency seen by the clients,
- CPU seconds the worker used per request (user + system, from /proc), and the
  cores it kept busy (CPU seconds over wall time), and the same for this
  load generator: when the generator's cores are busy, req/s is its limit.

Every number comes from /proc/<pid>/status and /proc/<pid>/stat of the worker
process (Linux only). With `--workers 1` the server process *is* the worker;
with more, the numbers are summed over the supervisor and all its children.
All traffic goes to 127.0.0.1, and every loop is bounded by `--rounds`.

Run from the repo root:

    .venv/bin/python bench/deploy_sizing.py                       # 1x256x56x56 float32, C = 1 2 4 8
    .venv/bin/python bench/deploy_sizing.py --workers 2 --concurrency 2 4
    .venv/bin/python bench/deploy_sizing.py --server-cpus 1   # server on 1 CPU, clients on the rest
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402  (tests/conftest.py: a `featcodec serve` process)

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def mib(kib: float) -> float:
    return kib / 1024


class Server(conftest.Server):
    """`featcodec serve`, ready, optionally pinned to ``cpus``, with its processes' memory
    and CPU time."""

    def __init__(self, workers: int, cpus: set[int] | None = None,
                 threads: int | None = None) -> None:
        env = {} if threads is None else {"FEATCODEC_MAX_CONCURRENCY": str(threads)}
        own = os.sched_getaffinity(0)
        if cpus:  # the server and its workers inherit the affinity at fork
            os.sched_setaffinity(0, cpus)
        try:
            super().__init__(workers, log_level="warning", ready_path="/readyz", **env)
        finally:
            os.sched_setaffinity(0, own)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        # With several workers, wait until every worker answers /readyz on its own:
        # give them a moment to finish importing after the first one is ready.
        if workers > 1:
            time.sleep(3)

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def rss_kib(self) -> int:
        return sum(status_kib(p, "VmRSS") for p in self.pids())

    def hwm_kib(self) -> int:
        return sum(status_kib(p, "VmHWM") for p in self.pids())

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())


def run_level(body: bytes, params: dict[str, str], workers: int, concurrency: int,
              rounds: int, cpus: set[int] | None, threads: int | None) -> dict[str, float]:
    server = Server(workers, cpus, threads)
    try:
        headers = {"Content-Type": "application/x-npy"}
        with httpx.Client(base_url=server.url, timeout=120) as c:
            c.post("/v1/compress", params=params, content=body,
                   headers=headers).raise_for_status()
        time.sleep(0.2)
        idle = server.rss_kib()
        cpu0 = server.cpu()
        own0 = time.process_time()
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        peak_sampled = [idle]
        stop = threading.Event()

        def sampler() -> None:  # VmRSS sampled every 5 ms, besides the kernel's VmHWM
            while not stop.is_set():
                try:
                    peak_sampled[0] = max(peak_sampled[0], server.rss_kib())
                except (OSError, KeyError):
                    pass
                time.sleep(0.005)

        barrier = threading.Barrier(concurrency)

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                barrier.wait()
                for _ in range(rounds):
                    t = time.perf_counter()
                    r = c.post("/v1/compress", params=params, content=body, headers=headers)
                    dt = time.perf_counter() - t
                    with lock:
                        if r.status_code == 200:
                            latencies.append(dt)
                        else:
                            errors.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        samp = threading.Thread(target=sampler)
        samp.start()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        samp.join()
        cpu = server.cpu() - cpu0
        own = time.process_time() - own0
        hwm = server.hwm_kib()
        if errors:
            raise SystemExit(f"{len(errors)} failed requests, first: {errors[0]}")
        n = len(latencies)
        latencies.sort()
        return {
            "idle": mib(idle), "hwm": mib(hwm), "sampled": mib(peak_sampled[0]),
            "per_req": mib(hwm - idle) / concurrency, "rps": n / wall,
            "p50": statistics.median(latencies) * 1000,
            "p95": latencies[min(n - 1, int(0.95 * n))] * 1000,
            "cpu_ms": cpu / n * 1000, "cores": cpu / wall,
            "client_cores": own / wall,
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,256,56,56", help="tensor shape (float32)")
    ap.add_argument("--method", default="linear")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=20, help="requests per client thread")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="FEATCODEC_MAX_CONCURRENCY of the server (default: the service's)")
    ap.add_argument("--server-cpus", type=int, default=0,
                    help="pin the server to this many CPUs and the load generator to the "
                         "others (0: no pinning, all share every CPU)")
    args = ap.parse_args()

    cpus = None
    if args.server_cpus:
        all_cpus = sorted(os.sched_getaffinity(0))
        if args.server_cpus >= len(all_cpus):
            raise SystemExit(f"--server-cpus must leave a CPU for the load generator "
                             f"(have {len(all_cpus)})")
        cpus = set(all_cpus[:args.server_cpus])
        os.sched_setaffinity(0, set(all_cpus[args.server_cpus:]))

    shape = tuple(int(s) for s in args.shape.split(","))
    x = np.maximum(np.random.default_rng(0).standard_normal(shape), 0).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    body = buf.getvalue()
    params = {"method": args.method, "bits": args.bits}
    threads = "default" if args.max_concurrency is None else args.max_concurrency
    print(f"featcodec serve --workers {args.workers} (FEATCODEC_MAX_CONCURRENCY {threads}); POST /v1/compress?method={args.method}"
          f"&bits={args.bits}; body {'x'.join(map(str, shape))} float32 .npy = "
          f"{len(body) / 2**20:.2f} MiB; {args.rounds} requests per client; "
          f"{os.cpu_count()} CPUs, server on "
          f"{'all' if cpus is None else len(cpus)}; Python {sys.version.split()[0]}, numpy {np.__version__}")
    print()
    print("| concurrent | idle RSS MiB | peak RSS MiB (VmHWM) | peak sampled MiB "
          "| (peak-idle)/concurrent MiB | req/s | p50 ms | p95 ms | CPU ms/req | busy cores | client busy cores |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        r = run_level(body, params, args.workers, c, args.rounds, cpus, args.max_concurrency)
        print(f"| {c} | {r['idle']:.0f} | {r['hwm']:.0f} | {r['sampled']:.0f} "
              f"| {r['per_req']:.1f} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} "
              f"| {r['cpu_ms']:.1f} | {r['cores']:.2f} | {r['client_cores']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
