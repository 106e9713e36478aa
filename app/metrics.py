"""Prometheus metrics: an ASGI middleware that counts requests, bytes and latency.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several workers), prometheus-client
keeps values in per-process files there and ``/metrics`` aggregates them, so
any worker answers for all. The variable must be set before this module is
imported: ``featcodec serve`` does that for ``--workers`` > 1.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, ProcessCollector, generate_latest, multiprocess)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The "method" label is the codec method, set by handlers in request.state.
STATE_KEY = "codec_method"

_REGISTRY = CollectorRegistry()
if not os.environ.get(MULTIPROC_ENV):
    ProcessCollector(registry=_REGISTRY)

REQUESTS = Counter("featcodec_http_requests", "HTTP requests handled",
                   ["endpoint", "method", "status"], registry=_REGISTRY)
ERRORS = Counter("featcodec_http_errors", "HTTP responses with status >= 400",
                 ["endpoint", "status"], registry=_REGISTRY)
LATENCY = Histogram("featcodec_http_request_duration_seconds",
                    "Time from request start to the end of the response",
                    ["endpoint", "method"], registry=_REGISTRY,
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                             60, 120))
BYTES_IN = Counter("featcodec_http_request_body_bytes", "Request body bytes received",
                   ["endpoint", "method"], registry=_REGISTRY)
BYTES_OUT = Counter("featcodec_http_response_body_bytes", "Response body bytes sent",
                    ["endpoint", "method"], registry=_REGISTRY)
JOBS = Gauge("featcodec_jobs_in_progress",
             "Codec and (de)serialization jobs running (in the worker thread pool, or on the "
             "event loop for a small request alone in flight)",
             registry=_REGISTRY, multiprocess_mode="livesum")
# conv2d (app/routers/conv.py, app/routers/layers.py): the compute step alone, per backend
CONV_SECONDS = Histogram("featcodec_conv_compute_seconds",
                         "qconv2d time inside the handler (no decoding, no serialization)",
                         ["endpoint", "backend"], registry=_REGISTRY,
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                  5, 10, 30))
CORRUPT_LAYERS = Counter("featcodec_corrupt_layer_files",
                         "Corrupt layer files found (each file version once per process)",
                         registry=_REGISTRY)


# Rate–distortion the fleet actually gets, per codec method (the one in the stream, so
# method=auto counts as what it chose) and lossless stage (none, ans, zstd).
SNR_ENV = "FEATCODEC_METRICS_SNR"
BITS_PER_ELEMENT = Histogram(
    "featcodec_compress_bits_per_element",
    "Bits per element of the streams /v1/compress returned, every header byte included",
    ["method", "entropy"], registry=_REGISTRY,
    buckets=(0.25, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32))
# A full decode per request would cost about as much as the encode itself; the SNR of a
# sample this size is within a few tenths of a dB of the whole tensor's, well inside the
# buckets' 5 dB.
SNR_SAMPLE = 1 << 14
SNR_DB = Histogram(
    "featcodec_compress_snr_db",
    "SNR in dB of what /v1/compress compressed (decoded stream against the input), on a "
    f"deterministic strided sample of about {SNR_SAMPLE} elements (the whole tensor when "
    f"smaller); off with {SNR_ENV}=0",
    ["method", "entropy"], registry=_REGISTRY,
    buckets=(0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 100, 150))
SNR_CAP_DB = 300.0  # an exact (lossless) result is counted here rather than as +inf


def snr_enabled() -> bool:
    """Whether /v1/compress measures the SNR (on a sample, see ``SNR_SAMPLE``): on unless
    ``FEATCODEC_METRICS_SNR`` is 0/false/no/off."""
    return os.environ.get(SNR_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def observe_compression(method: str, entropy: str, bits_per_element: float | None,
                        snr_db: float | None) -> None:
    if bits_per_element is not None:
        BITS_PER_ELEMENT.labels(method, entropy).observe(bits_per_element)
    if snr_db is not None and snr_db == snr_db:  # not NaN (an all-zero tensor has no SNR)
        SNR_DB.labels(method, entropy).observe(min(snr_db, SNR_CAP_DB))


def render() -> tuple[bytes, str]:
    """The exposition text (aggregated over workers in multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(_REGISTRY), CONTENT_TYPE_LATEST


def process_exit() -> None:
    """Drop this worker's live gauges from the shared directory."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so bodies stream through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        start = time.perf_counter()
        seen = {"in": 0, "out": 0, "status": 500}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:  # an exception here becomes a 500 in the outer error middleware
            route = scope.get("route")
            # path_format: the documented path ("/v1/layers/{name}", not "{name:path}")
            endpoint = (getattr(route, "path_format", None) or getattr(route, "path", None)
                        or "unmatched")
            method = str(state.get(STATE_KEY, ""))
            status = str(seen["status"])
            REQUESTS.labels(endpoint, method, status).inc()
            if seen["status"] >= 400:
                ERRORS.labels(endpoint, status).inc()
            LATENCY.labels(endpoint, method).observe(time.perf_counter() - start)
            BYTES_IN.labels(endpoint, method).inc(seen["in"])
            BYTES_OUT.labels(endpoint, method).inc(seen["out"])
