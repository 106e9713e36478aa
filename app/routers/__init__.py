"""HTTP routes: the codec endpoints under /v1 and the operational ones, and the two
helpers every /v1 router uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..metrics import JOBS
from ..settings import Settings

T = TypeVar("T")


async def offload(func: Callable[..., T], *args: Any) -> T:
    """Run CPU-bound work in the thread pool so the event loop keeps answering."""
    with JOBS.track_inprogress():
        return await run_in_threadpool(func, *args)


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings
