"""RFC 9457 problem documents and the exception handlers that produce them."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:featcodec:problem:"
log = logging.getLogger("featcodec.service")


class Problem(BaseModel):
    """An RFC 9457 problem document; extension members may follow."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "urn:featcodec:problem:invalid-parameters",
        "title": "Invalid parameters",
        "status": 422,
        "detail": "linear: bits must be in [1, 8], got 9",
        "instance": "/v1/compress",
    }]})

    type: str = Field("about:blank", description="URI identifying the problem type")
    title: str
    status: int
    detail: str
    instance: str | None = None


class ProblemError(Exception):
    """Raised by the HTTP layer; rendered as a problem document."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers

    def document(self, instance: str | None = None) -> dict[str, Any]:
        """This error's problem document (the body of its response)."""
        doc: dict[str, Any] = {"type": TYPE_PREFIX + self.slug, "title": self.title,
                               "status": self.status, "detail": self.detail}
        if instance is not None:
            doc["instance"] = instance
        return doc


class MalformedBody(ProblemError):
    status, slug, title = 400, "malformed-body", "Malformed request body"


class MalformedRequest(ProblemError):  # sent by app.limits' protocol, not by a handler
    status, slug, title = 400, "malformed-request", "Malformed request"


class MalformedBitstream(ProblemError):
    status, slug, title = 400, "malformed-bitstream", "Malformed bitstream"


class BodyTooLarge(ProblemError):
    status, slug, title = 413, "body-too-large", "Request body too large"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class NotAcceptable(ProblemError):
    status, slug, title = 406, "not-acceptable", "Not acceptable"


class InvalidParameters(ProblemError):
    status, slug, title = 422, "invalid-parameters", "Invalid parameters"


class ServiceUnavailable(ProblemError):
    status, slug, title = 503, "service-unavailable", "Service unavailable"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Unauthorized"


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "Forbidden"


class RequestTimeout(ProblemError):
    status, slug, title = 408, "request-timeout", "Request timeout"


class HeadersTooLarge(ProblemError):
    status, slug, title = 431, "headers-too-large", "Request header fields too large"


class Overloaded(ProblemError):
    status, slug, title = 503, "overloaded", "Service overloaded"


def problem_response(request: Request, status: int, title: str, detail: str,
                     type_: str = "about:blank", headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body = {"type": type_, "title": title, "status": status, "detail": detail,
            "instance": request.url.path, **extra}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers,
                        media_type=PROBLEM_JSON)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.title, exc.detail,
                            TYPE_PREFIX + exc.slug, exc.headers)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only location, message and kind: "input" and "ctx" may echo arbitrary objects.
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return problem_response(request, 422, InvalidParameters.title, detail or "invalid request",
                            TYPE_PREFIX + InvalidParameters.slug, errors=errors)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    return problem_response(request, exc.status_code, _phrase(exc.status_code), detail,
                            headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Never leak internals: log the traceback, answer with a generic document.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, _phrase(500), "the server failed to handle the request")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem documents."""
    ref = {"$ref": "#/components/schemas/Problem"}  # added to components by app.main
    return {s: {"description": _phrase(s), "content": {PROBLEM_JSON: {"schema": ref}}}
            for s in statuses}
