"""Resource limits for hostile or broken clients (docs/SECURITY.md).

- :class:`LimitsMiddleware` (pure ASGI): admission control, so that at most
  ``max_concurrency + max_queue`` ``/v1`` requests are in flight per process and
  the next ones get 503 with ``Retry-After`` at once instead of queuing without
  bound; and a deadline of ``body_timeout_s`` for the whole request body, after
  which the request gets 408 and its connection is closed.
- :func:`configure_threads`: the worker thread pool (``run_in_threadpool``)
  gets ``max_concurrency`` threads.
- :class:`HeaderTimeoutH11Protocol`: uvicorn's h11 protocol with a deadline for
  the request line and headers (uvicorn has none: its keep-alive timer restarts
  on every byte, so a client dribbling a header byte at a time is never cut off).
- :func:`exit_zero_on_sigterm`: ``featcodec serve`` exits 0 after a graceful
  shutdown on SIGTERM (uvicorn re-raises the signal after draining, which would
  otherwise kill the process with status 143).

The protocol also closes a connection ``LINGER_S`` after answering a request
whose body it did not read (401, 413, 415, 503...): uvicorn would otherwise go on
reading and discarding that body for as long as the client sends it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Awaitable
from functools import cache
from typing import Any

import anyio.to_thread
import h11
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .problems import PROBLEM_JSON, TYPE_PREFIX, Overloaded, RequestTimeout, responses
from .settings import Settings

ADMITTED_PREFIX = "/v1/"
RETRY_AFTER_S = 1
# A receive that is due when the deadline has passed still gets this long, so a body
# that already arrived is not refused merely because the app asked for it late.
_GRACE_S = 0.05
# How long a connection answered before its request body was read stays open to drain it.
LINGER_S = 2.0


class LimitsMiddleware:
    """Admission control and the request-body deadline (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.capacity = settings.max_concurrency + settings.max_queue
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ADMITTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.capacity:
            await self._overloaded(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, self._with_deadline(receive), send)
        finally:
            self.in_flight -= 1

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (f"{self.in_flight} requests in progress, the limit is {self.capacity} "
                  f"(FEATCODEC_MAX_CONCURRENCY + FEATCODEC_MAX_QUEUE); retry later")
        body = {"type": TYPE_PREFIX + Overloaded.slug, "title": Overloaded.title,
                "status": Overloaded.status, "detail": detail, "instance": scope["path"]}
        response = JSONResponse(jsonable_encoder(body), status_code=Overloaded.status,
                                media_type=PROBLEM_JSON,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        await response(scope, receive, send)

    def _with_deadline(self, receive: Receive) -> Receive:
        timeout = self.settings.body_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        complete = False

        async def receive_before_deadline() -> Message:
            nonlocal complete
            if complete:  # after the body: a wait for the disconnect, not for data
                return await receive()
            try:
                message = await _within(receive(), max(deadline - loop.time(), _GRACE_S))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {timeout:g} s "
                                     "(FEATCODEC_BODY_TIMEOUT_S)",
                                     headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        return receive_before_deadline


if sys.version_info >= (3, 11):
    async def _within(awaitable: Awaitable[Message], seconds: float) -> Message:
        # a timer; wait_for (before 3.12) would make a task for every chunk of a body
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


def configure_threads(settings: Settings) -> None:
    """Size the default thread pool of the running event loop (call from the lifespan)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.max_concurrency


def document(schema: dict[str, Any]) -> None:
    """Add the 408 and 503 answers of this module to the ``/v1`` operations."""
    for path, item in schema.get("paths", {}).items():
        if not path.startswith(ADMITTED_PREFIX):
            continue
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            extra = responses(408, 503) if "requestBody" in op else responses(503)
            for status, response in extra.items():
                op["responses"].setdefault(str(status), response)


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY, as asyncio sets it itself only on sockets whose protocol number is
    IPPROTO_TCP: with ``--workers`` > 1 uvicorn binds ``socket.socket(family)`` (protocol
    0), and the tail of every response then waits for the client's delayed ACK (40 ms)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@cache
def _header_timeout() -> float:
    return Settings().header_timeout_s  # read once per process from FEATCODEC_* variables


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request line and headers do not
    arrive within ``FEATCODEC_HEADER_TIMEOUT_S`` (from connect, or from the end of the
    previous response on a kept-alive connection), and with Nagle's algorithm off."""

    _header_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_delay(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the peer erred)
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before the body was read (401, 413, 415, 503, ...): uvicorn discards
            # what still arrives, for as long as it arrives. Give the client LINGER_S to
            # stop sending and read the answer, then close.
            self._disarm_header_timer()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            self._linger_timer = self.loop.call_later(LINGER_S, self._linger_over, self.cycle)
            super().on_response_complete()
            return
        self._arm_header_timer()  # before super(): it may already parse a pipelined request
        super().on_response_complete()
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(_header_timeout(), self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _linger_over(self, cycle: Any) -> None:
        self._linger_timer = None
        if self.cycle is cycle and not self.transport.is_closing():  # no new request since
            self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection: no complete request headers within "
                              "%gs", _header_timeout())
            self.transport.close()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def exit_zero_on_sigterm() -> None:
    """Make SIGTERM end the process with status 0.

    uvicorn handles SIGTERM itself while it runs (graceful shutdown), then restores the
    previous handler and raises the signal again; with this handler that last step is a
    clean ``SystemExit(0)`` rather than death by signal.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
