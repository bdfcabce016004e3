"""What a browser may reach: the Origin allow-list, and who a REST call acts for.

A page on another site can make an operator's browser open a WebSocket to
the gateway or send it a "simple" POST (``text/plain``, no preflight). Three
things stop that, each on its own:

* :class:`OriginGuard` refuses any request or WebSocket upgrade whose
  ``Origin`` is neither the gateway's own (the ``Host`` it was reached by) nor
  listed in ``auth.allowed_origins`` (403 before anything runs; a WebSocket
  is refused at the handshake). Clients that are not browsers send no Origin
  and pass; they still need a token.
* state-changing routes require ``Content-Type: application/json``, which no
  cross-site form or simple request can send without a CORS preflight (415);
* tokens come only from the ``Authorization`` header (never a cookie), which
  a browser never attaches on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.gateway.auth import Authenticator, AuthError, Principal, bearer
from relay.gateway.metrics import Metrics


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request with this ``Origin`` (and ``Host``) may proceed."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    # Same origin: the page was served by this gateway under the name the
    # browser used to reach it (the scheme may differ behind a TLS proxy).
    return (
        parts.scheme in ("http", "https")
        and bool(host)
        and parts.netloc == (host or "").strip().lower()
        and not parts.path
    )


def origin_set(allowed: Iterable[str]) -> frozenset[str]:
    """``auth.allowed_origins`` as :func:`origin_allowed` compares them (lower case)."""
    return frozenset(o.lower() for o in allowed)


def scope_origin_allowed(scope: Scope, allowed: Iterable[str]) -> bool:
    """:func:`origin_allowed` for the ``Origin`` and ``Host`` headers of an ASGI scope."""
    # Not a dict of every header: the caller's frame may live as long as its
    # WebSocket (about 700 bytes each, kept by every idle connection).
    origin = host = None
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    return origin_allowed(origin, host, allowed)


class OriginGuard:
    """ASGI middleware: refuse cross-origin HTTP requests and WebSocket upgrades."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str], metrics: list[Metrics]) -> None:
        self.app = app
        self.allowed = origin_set(allowed)
        self._metrics = metrics
        """Filled by the lifespan (the registry is made there); empty before."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope_origin_allowed(scope, self.allowed):
            await self.app(scope, receive, send)
            return
        for registry in self._metrics:
            registry.auth_failures.labels(reason="origin").inc()
        if scope["type"] == "websocket":
            # Closing before accept: the server answers the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return
        body = json.dumps(
            {"type": "error", "code": "origin_not_allowed", "message": "origin not allowed"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class HttpRefusal(Exception):
    """A REST call refused before it runs; :meth:`response` is what the client gets."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        """The JSON error answer (with ``WWW-Authenticate`` on a 401)."""
        headers = {"WWW-Authenticate": 'Bearer realm="relay"'} if self.status == 401 else None
        frame = {"type": "error", "code": self.code, "message": self.message}
        return JSONResponse(frame, status_code=self.status, headers=headers)


async def rest_principal(
    request: Request, auth: Authenticator, anonymous: Principal, metrics: Metrics
) -> Principal:
    """Who a REST call acts for: ``Authorization: Bearer`` only; 401 without a valid one."""
    if not auth.enabled:
        return anonymous
    token = bearer(request.headers.get("authorization"))
    if token is None:
        metrics.auth_failures.labels(reason="missing").inc()
        raise HttpRefusal(401, "unauthorized", "an Authorization: Bearer token is required")
    try:
        return await auth.verify(token)
    except AuthError as exc:
        metrics.auth_failures.labels(reason="invalid").inc()
        raise HttpRefusal(401, "invalid_token", str(exc)) from None


def require_json(request: Request) -> None:
    """415 unless the body is declared ``application/json`` (what no simple request can send)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HttpRefusal(
            415,
            "unsupported_media_type",
            "state-changing requests need Content-Type: application/json",
        )
