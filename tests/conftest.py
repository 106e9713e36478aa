"""Service test helpers: a real `featcodec serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `featcodec serve` process; its output goes to a file we can show on failure (a
    temporary one, removed by :meth:`stop`, unless ``log`` names one to keep). Also the
    server of the service benchmarks in bench/."""

    def __init__(self, workers: int = 1, *, log_level: str = "info",
                 ready_path: str = "/healthz", log: Path | None = None, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self._keep_log = log is not None
        # closed in stop()
        self._log = (open(log, "wb") if log is not None  # noqa: SIM115
                     else tempfile.NamedTemporaryFile(prefix="featcodec-serve-", suffix=".log",
                                                      delete=False))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FEATCODEC_")}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        environ.update(env)
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(workers), "--log-level", log_level]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def stderr(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer {self.ready_path} in {timeout}s:\n"
                           f"{self.stderr()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if not self._keep_log:
            os.unlink(self._log.name)
        return self.proc.returncode


def peak_memory(fn: Callable[..., Any], *args: Any) -> tuple[int, Exception | None]:
    """The peak of Python-traced allocations (tracemalloc) while ``fn(*args)`` runs, and
    the exception it raised, if any."""
    tracemalloc.start()
    try:
        fn(*args)
        error = None
    except Exception as exc:  # noqa: BLE001 - returned for the caller to check
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def serve(workers: int = 1, **env: str) -> Iterator[Server]:
    server = Server(workers, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    yield from serve()


@pytest.fixture(scope="session")
def small_server() -> Iterator[Server]:
    """Tight limits, to provoke 413 without large bodies."""
    yield from serve(FEATCODEC_MAX_BODY_BYTES="4096", FEATCODEC_MAX_ELEMENTS="1000")


@pytest.fixture(scope="session")
def multi_server() -> Iterator[Server]:
    yield from serve(workers=2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:  # show the server's own log next to the failing test
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Server):
                report.sections.append((f"featcodec serve :{value.port} log",
                                        value.stderr()[-20000:]))


@pytest.fixture(scope="session")
def api_key_server() -> Iterator[Server]:
    """API keys configured: /v1 calls need 'Authorization: Bearer first-key' (or second-key)."""
    yield from serve(FEATCODEC_API_KEYS="first-key,second-key")
