"""HTTP routes: the codec endpoints under /v1 and the operational ones, and the two
helpers every /v1 router uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..limits import alone
from ..metrics import JOBS
from ..settings import Settings

T = TypeVar("T")

# A job on a tensor this small runs on the event loop itself when its request is the only
# /v1 request in flight: the hand-off to the pool and back costs two thread wake-ups,
# more than plain quantization of that much data, and with no other request in flight
# the loop has nothing else to do.
INLINE_MAX_BYTES = 256 * 1024


async def offload(func: Callable[..., T], *args: Any, inline: bool = False) -> T:
    """Run CPU-bound work in the thread pool so the event loop keeps answering; with
    ``inline`` (see :func:`may_inline`), on the loop."""
    with JOBS.track_inprogress():
        if inline:
            return func(*args)
        return await run_in_threadpool(func, *args)


def may_inline(request: Request, tensor_bytes: int) -> bool:
    """Whether a cheap job (no calibration, search or entropy coding) on a tensor of
    ``tensor_bytes`` may run on the event loop: small, and its request alone."""
    return tensor_bytes <= INLINE_MAX_BYTES and alone(request)


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
