"""Liveness, readiness and metrics; none of them touches the codec."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from .. import metrics
from ..problems import ServiceUnavailable, responses

router = APIRouter(tags=["operations"])


class Status(BaseModel):
    status: Literal["ok", "ready"]


@router.get("/healthz", response_model=Status, summary="Liveness",
            responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> Status:
    """The process is up and its event loop answers."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, summary="Readiness",
            responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}},
                       **responses(503)})
async def readyz(request: Request) -> Status:
    """Startup finished and the codec passed its self-test; 503 until then."""
    if not getattr(request.app.state, "ready", False):
        raise ServiceUnavailable("the service is starting or its self-test failed")
    return Status(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"},
                                                        "example": "featcodec_http_requests_total"
                                                                   "{endpoint=\"/v1/compress\","
                                                                   "method=\"linear\","
                                                                   "status=\"200\"} 3.0\n"}}}})
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
