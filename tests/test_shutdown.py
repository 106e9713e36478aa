"""Graceful shutdown of a real `featcodec serve`: SIGTERM lets in-flight requests finish.

A request is known to be in flight, without any sleep, through `Expect: 100-continue`:
uvicorn sends `100 Continue` only when the handler asks for the body.
"""

from __future__ import annotations

import io
import signal
import socket
import subprocess

import numpy as np
import pytest

import codec
from conftest import Server

pytestmark = pytest.mark.integration


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def read_head(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str]]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers


def read_body(sock: socket.socket, buf: bytearray, length: int) -> bytes:
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection mid-response"
        buf += chunk
    return bytes(buf[:length])


def start_in_flight(server: Server, path: str, length: int) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Type: application/x-npy\r\nContent-Length: {length}\r\n"
                  "Expect: 100-continue\r\n\r\n").encode())
    buf = bytearray()
    status, _ = read_head(sock, buf)
    assert status == 100
    return sock, buf


def wait_exit(server: Server, timeout: float = 90) -> int:
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail(f"the server did not exit after SIGTERM:\n{server.stderr()[-4000:]}")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_the_in_flight_request_and_exits_0(workers: int) -> None:
    x = np.random.default_rng(3).standard_normal((16, 64, 64, 64)).astype(np.float32)
    body = npy(x)  # 16 MiB: the upload and the encode both outlive the signal
    server = Server(workers, FEATCODEC_GRACEFUL_TIMEOUT_S="120")
    try:
        server.wait_ready()
        sock, buf = start_in_flight(server, "/v1/compress?method=mulaw&axis=1", len(body))
        with sock:
            sock.sendall(body[: len(body) // 2])
            server.proc.send_signal(signal.SIGTERM)  # mid-upload
            sock.sendall(body[len(body) // 2:])
            status, headers = read_head(sock, buf)
            assert status == 200, server.stderr()[-4000:]
            answer = read_body(sock, buf, int(headers["content-length"]))
            assert sock.recv(1) == b""  # no keep-alive while draining: closed after it
        assert wait_exit(server) == 0, server.stderr()[-4000:]
        assert answer == codec.encode(x, method="mulaw", axis=1)
        log = server.stderr()
        assert "Traceback" not in log
        assert "Finished server process" in log
    finally:
        server.stop()


def test_graceful_timeout_bounds_the_wait() -> None:
    """A request that never completes cannot keep the process alive past
    FEATCODEC_GRACEFUL_TIMEOUT_S."""
    server = Server(1, FEATCODEC_GRACEFUL_TIMEOUT_S="1")
    try:
        server.wait_ready()
        sock, _ = start_in_flight(server, "/v1/compress", 1000)  # and never send the body
        with sock:
            server.proc.send_signal(signal.SIGTERM)
            assert wait_exit(server, timeout=60) == 0, server.stderr()[-4000:]
        assert "timeout graceful shutdown exceeded" in server.stderr()
    finally:
        server.stop()


def test_sigterm_when_idle_exits_0() -> None:
    server = Server(1)
    try:
        server.wait_ready()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_exit(server) == 0, server.stderr()[-4000:]
    finally:
        server.stop()
