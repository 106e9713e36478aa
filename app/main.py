"""The application factory (``uvicorn app.main:create_app --factory``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

import codec

from . import auth, limits, metrics, problems
from .routers import codec as codec_routes
from .routers import conv as conv_routes
from .routers import health
from .routers import layers as layer_routes
from .settings import Settings

log = logging.getLogger("featcodec.service")

DESCRIPTION = """Quantize neural-network feature maps into checksummed featcodec bitstreams.

Errors are RFC 9457 problem documents (`application/problem+json`).
"""


def _self_test() -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    if codec.decode(codec.encode(x)).shape != x.shape:
        raise RuntimeError("codec self-test: round trip changed the shape")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    limits.configure_threads(app.state.settings)
    try:
        await run_in_threadpool(_self_test)
        # load the conv2d backend now (not on the first request); fails for an unusable ort
        await run_in_threadpool(conv_routes.warm_up, app.state.settings)
        app.state.ready = True
    except Exception:  # stay alive but unready: /readyz tells the orchestrator
        log.exception("codec self-test failed; /readyz will answer 503")
    yield
    app.state.ready = False
    metrics.process_exit()


def create_app(settings: Settings | None = None) -> FastAPI:
    # require_api_key applies to every route of every router (health and metrics exempt).
    app = FastAPI(title="featcodec", version=codec.__version__, description=DESCRIPTION,
                  lifespan=_lifespan, dependencies=[Depends(auth.require_api_key)])
    app.state.settings = settings = settings or Settings()
    app.state.ready = False
    problems.install(app)
    app.add_middleware(limits.LimitsMiddleware, settings=settings)  # inside the metrics
    app.add_middleware(metrics.MetricsMiddleware)
    app.include_router(codec_routes.router)
    app.include_router(conv_routes.router)
    app.include_router(layer_routes.router)
    app.include_router(health.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            # Problem is referenced from hand-written responses, so FastAPI does not emit it.
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = \
                problems.Problem.model_json_schema()
            auth.document(schema, app.routes, settings)
            limits.document(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
