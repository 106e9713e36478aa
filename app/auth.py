"""API-key authentication: ``Authorization: Bearer KEY`` (docs/SECURITY.md).

``create_app`` installs :func:`require_api_key` as a global dependency, so every
route of every router needs a key once ``FEATCODEC_API_KEYS`` is set, except the
operations endpoints in :func:`public_paths` (``/healthz``, ``/readyz``, and
``/metrics`` unless ``FEATCODEC_METRICS_PUBLIC=false``). The OpenAPI document and
its UI are static routes without dependencies, hence public.

Routes that change server state (layer registration and deletion) also depend on
:func:`require_layer_write`: with no keys configured, nobody may call them unless
``FEATCODEC_OPEN_LAYER_WRITES=true``.

Keys are compared in constant time: the SHA-256 digests of the presented token
and of every configured key are compared with ``hmac.compare_digest``, always
against all keys, so neither the position of a matching key nor the length of
any key shows in the response time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from .problems import Forbidden, Unauthorized, responses
from .settings import Settings

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
SECURITY_SCHEME = "bearerAuth"
REALM = "featcodec"
_CHALLENGE = f'Bearer realm="{REALM}"'
_INVALID = f'Bearer realm="{REALM}", error="invalid_token"'


def public_paths(settings: Settings) -> frozenset[str]:
    """Paths answered without a key whatever the configuration."""
    return HEALTH_PATHS | {METRICS_PATH} if settings.metrics_public else HEALTH_PATHS


@lru_cache(maxsize=16)
def _digests(raw: str) -> tuple[bytes, ...]:
    keys = (k.strip() for k in raw.split(","))
    return tuple(hashlib.sha256(k.encode()).digest() for k in keys if k)


def _keys(settings: Settings) -> tuple[bytes, ...]:
    return _digests(settings.api_keys.get_secret_value())


def key_matches(token: str, digests: tuple[bytes, ...]) -> bool:
    """Whether ``token`` is one of the keys; the same work whichever key (if any) matches."""
    presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    found = False
    for digest in digests:  # no early exit
        found |= hmac.compare_digest(presented, digest)
    return found


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _route_path(request: Request) -> str:
    route = request.scope.get("route")
    return str(getattr(route, "path", None) or request.url.path)


def authenticate(request: Request, digests: tuple[bytes, ...]) -> None:
    """Raise 401 unless the request carries one of the keys."""
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer KEY'",
                           headers={"WWW-Authenticate": _CHALLENGE})
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer KEY'",
                           headers={"WWW-Authenticate": _INVALID})
    if not key_matches(token.strip(), digests):
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": _INVALID})


async def require_api_key(request: Request) -> None:
    """Global dependency: a valid key when keys are configured, except on public paths."""
    settings = _settings(request)
    digests = _keys(settings)
    if digests and _route_path(request) not in public_paths(settings):
        authenticate(request, digests)


async def require_layer_write(request: Request) -> None:
    """Dependency for routes that register or delete layers.

    With keys configured: a valid key (as everywhere). Without: 403, unless
    ``FEATCODEC_OPEN_LAYER_WRITES=true`` opens these routes to everyone.
    """
    settings = _settings(request)
    digests = _keys(settings)
    if digests:
        authenticate(request, digests)
    elif not settings.open_layer_writes:
        raise Forbidden("layer writes are disabled: the server has no API keys configured "
                        "(set FEATCODEC_API_KEYS, or FEATCODEC_OPEN_LAYER_WRITES=true to allow "
                        "them without authentication)")


def api_routes(routes: list[Any]) -> Iterator[tuple[str, set[str], Any]]:
    """(full path, methods, dependant) of every API route, through included routers
    (which recent FastAPI keeps nested rather than copying into ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
        contexts: Any = iter_route_contexts(routes)
    except ImportError:  # older FastAPI: include_router copies routes, prefix included
        contexts = routes
    for route in contexts:
        original = getattr(route, "original_route", route)
        if isinstance(original, APIRoute):
            # path_format: the documented path ("/v1/layers/{name}", not "{name:path}")
            path = getattr(route, "path_format", None) or route.path
            yield str(path), set(route.methods or ()), route.dependant


def uses(dependant: Any, dependency: Any) -> bool:
    """Whether ``dependency`` is among a route's dependencies, at any depth."""
    stack = [dependant]
    while stack:
        dep = stack.pop()
        if dep.call is dependency:
            return True
        stack.extend(dep.dependencies)
    return False


def document(schema: dict[str, Any], routes: list[Any], settings: Settings) -> None:
    """Add the bearer scheme, ``security`` and the 401/403 answers to an OpenAPI document,
    as the running configuration enforces them."""
    keyed = bool(_keys(settings))
    public = public_paths(settings)
    writes = {(path, m.lower()) for path, methods, dependant in api_routes(routes)
              if uses(dependant, require_layer_write) for m in methods}
    if keyed:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[
            SECURITY_SCHEME] = {"type": "http", "scheme": "bearer",
                                "description": "one of the keys in FEATCODEC_API_KEYS"}
    for path, item in schema.get("paths", {}).items():
        if path in public:
            continue
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            extra: dict[int | str, Any] = {}
            if keyed:
                op["security"] = [{SECURITY_SCHEME: []}]
                extra.update(responses(401))
            elif (path, method) in writes and not settings.open_layer_writes:
                extra.update(responses(403))
            for status, response in extra.items():
                op["responses"].setdefault(str(status), response)
