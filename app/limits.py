"""Resource limits for hostile or broken clients (docs/SECURITY.md).

- :class:`LimitsMiddleware` (pure ASGI): admission control, so that at most
  ``max_concurrency + max_queue`` ``/v1`` requests are in flight per process and
  the next ones get 503 with ``Retry-After`` at once instead of queuing without
  bound; and a deadline of ``body_timeout_s`` for the whole request body, after
  which the request gets 408 and its connection is closed.
- :func:`configure_threads`: the worker thread pool (``run_in_threadpool``)
  gets ``max_concurrency`` threads.
- :class:`GuardedHttpToolsProtocol`: uvicorn's httptools protocol with a deadline
  and a size limit for the request line and headers (uvicorn has neither: its
  keep-alive timer restarts on every byte, so a client dribbling a header byte at
  a time is never cut off).
- :func:`exit_zero_on_sigterm`: ``featcodec serve`` exits 0 after a graceful
  shutdown on SIGTERM (uvicorn re-raises the signal after draining, which would
  otherwise kill the process with status 143).

The protocol also closes a connection ``LINGER_S`` after answering a request
whose body it did not read (401, 413, 415, 503...): uvicorn would otherwise go on
reading and discarding that body for as long as the client sends it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Awaitable
from functools import cache
from typing import Any

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .problems import (PROBLEM_JSON, HeadersTooLarge, MalformedRequest, Overloaded,
                       ProblemError, RequestTimeout, responses)
from .settings import Settings

ADMITTED_PREFIX = "/v1/"
RETRY_AFTER_S = 1
# A receive that is due when the deadline has passed still gets this long, so a body
# that already arrived is not refused merely because the app asked for it late.
_GRACE_S = 0.05
# How long a connection answered before its request body was read stays open to drain it.
LINGER_S = 2.0
# Request line and header fields, as h11 (uvicorn's pure-Python parser) bounds them.
MAX_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE = HeadersTooLarge(f"the URL and header fields exceed {MAX_HEAD_BYTES} bytes")
_MALFORMED = MalformedRequest("the request is not valid HTTP/1.1")
_IN_FLIGHT = "featcodec_in_flight"  # request state: the middleware's count, as a callable


def alone(request: Request) -> bool:
    """Whether ``request`` is the only ``/v1`` request in flight in this process (False
    when :class:`LimitsMiddleware` does not count them)."""
    count = request.scope.get("state", {}).get(_IN_FLIGHT)
    return count is not None and count() == 1


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
        scope.setdefault("state", {})[_IN_FLIGHT] = self._in_flight
        try:
            await self.app(scope, self._with_deadline(receive), send)
        finally:
            self.in_flight -= 1

    def _in_flight(self) -> int:
        return self.in_flight

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (f"{self.in_flight} requests in progress, the limit is {self.capacity} "
                  f"(FEATCODEC_MAX_CONCURRENCY + FEATCODEC_MAX_QUEUE); retry later")
        response = JSONResponse(Overloaded(detail).document(scope["path"]),
                                status_code=Overloaded.status, media_type=PROBLEM_JSON,
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


class _HeadTooLarge(Exception):
    """Raised in a parser callback; httptools then stops and reports a parser error."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards uvicorn lacks, and Nagle's algorithm off.

    - A deadline for the request line and headers: ``FEATCODEC_HEADER_TIMEOUT_S`` from
      connect, or from the end of the previous response on a kept-alive connection.
    - A size limit for them, ``MAX_HEAD_BYTES`` (431): httptools has none of its own and
      gathers a header field in memory until it ends.
    - ``LINGER_S`` for a connection answered before its body was read.
    - Parser errors answered with a problem document (uvicorn's is plain text).
    """

    _header_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _in_head = False  # between the first byte of a request and the end of its headers
    _head_bytes = 0
    _refusal: ProblemError | None = None  # sent once the running request ends
    _refused = False  # a refusal was sent: the connection only drains until it closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_delay(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered and closing: drop what the client still sends
            return
        whole_chunk_in_head = self._in_head
        super().data_received(data)
        # Callbacks see the URL as it comes but a header field only once it ends, so
        # count what arrives while the head stays incomplete, too: that bounds memory.
        if whole_chunk_in_head and self._in_head and self._refusal is None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_after_answers(_HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_header_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a parser error
        self._refuse_after_answers(_HEAD_TOO_LARGE if self._head_bytes > MAX_HEAD_BYTES
                                   else _MALFORMED)

    def on_response_complete(self) -> None:
        if not self.pipeline and not self.transport.is_closing():
            if self._refusal is not None:
                self._refuse(self._refusal)
            elif self.cycle.more_body:
                # Answered before the body was read (401, 413, 415, 503, ...): uvicorn
                # discards what still arrives, for as long as it arrives. Give the client
                # LINGER_S to stop sending and read the answer, then close.
                self._disarm_header_timer()
                if self._linger_timer is not None:
                    self._linger_timer.cancel()
                self._linger_timer = self.loop.call_later(LINGER_S, self._linger_over,
                                                          self.cycle)
            else:
                self._arm_header_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def _refuse_after_answers(self, refusal: ProblemError) -> None:
        """Refuse what cannot be parsed, and close; but first let the request before it
        on this connection be answered, if it arrived whole (a pipelined client)."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.more_body \
                and not self.cycle.response_complete:
            self._refusal = refusal
            self.flow.pause_reading()
        else:
            self._refuse(refusal)

    def _refuse(self, problem: ProblemError) -> None:
        """A problem document, then a lingering close: the parser cannot go on after an
        error, but closing with unread input would reset the connection, and the reset
        can destroy the answer before the client reads it."""
        body = json.dumps(problem.document()).encode()
        head = (f"HTTP/1.1 {problem.status} {problem.title}\r\n"
                f"content-type: {PROBLEM_JSON}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode("latin-1") + body)
        self._refused = True
        self._disarm_header_timer()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # to drain, if a deferred refusal had paused it
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

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
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
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
