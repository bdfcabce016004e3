"""The gateway's Starlette application: routes and lifespan.

``create_app(config)`` is the factory uvicorn (and the tests) run. The
lifespan owns the Redis clients and the :class:`Hub`; nothing is created at
import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from relay import redisconn
from relay.config import GlobalConfig, load_config
from relay.gateway.actions import Actions
from relay.gateway.agui_http import agui_route
from relay.gateway.auth import (
    CLOSE_POLICY,
    SUBPROTOCOL,
    Authenticator,
    AuthError,
    Principal,
    anonymous_principal,
    websocket_token,
)
from relay.gateway.connection import Connection
from relay.gateway.durable import EXPOSED_HEADERS, durable_routes
from relay.gateway.eventstream import Drain
from relay.gateway.guard import HttpRefusal, OriginGuard, require_json, rest_principal
from relay.gateway.hub import Hub
from relay.gateway.limits import HTTP_STATUS, Limits, read_body, subject_key
from relay.gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from relay.gateway.reaper import Reaper
from relay.gateway.sendqueue import SendTurns
from relay.gateway.shedder import OverloadShedder
from relay.gateway.shortcut import KeepServerSend, SocketShortcut
from relay.gateway.sse import events_sse
from relay.gateway.static import console_routes
from relay.wire.commands import CommandError, load_object

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    """What the routes share; built by the lifespan, one per process."""

    config: GlobalConfig
    redis: Redis
    hub: Hub
    metrics: Metrics
    actions: Actions
    turns: SendTurns
    auth: Authenticator
    anonymous: Principal
    """Every client's principal while auth is off."""
    limits: Limits

    async def principal(self, request: Request) -> Principal:
        """Who a REST call acts for (:class:`HttpRefusal` 401 without a valid token)."""
        return await rest_principal(request, self.auth, self.anonymous, self.metrics)


def _redis_clients(config: GlobalConfig) -> tuple[Redis, Redis, Redis]:
    # Built by relay/redisconn.py from [redis], like every Redis client relay uses.
    return (
        redisconn.command_client(config),
        redisconn.control_client(config),
        redisconn.pubsub_client(config),
    )


def _reaper(
    config: GlobalConfig, commands: Redis, metrics: Metrics, gateway_id: str
) -> Reaper | None:
    """The lease reaper (``lease.reaper``), on its own Redis user when one is configured."""
    if not config.lease.reaper:
        return None
    url = config.lease.reaper_redis_url
    if not url:
        return Reaper(config, commands, metrics, gateway_id=gateway_id)
    own = redisconn.client(config.redis.model_copy(update={"url": url}))
    return Reaper(config, own, metrics, owns_redis=True, gateway_id=gateway_id)


def services(scope_holder: Request | WebSocket) -> Services:
    """The :class:`Services` of the running app."""
    svc: Services = scope_holder.app.state.services
    return svc


async def events_ws(websocket: WebSocket) -> None:
    svc = services(websocket)
    offered: list[str] = websocket.scope.get("subprotocols") or []
    # Echo relay.v1 when offered (a browser that offers subprotocols fails a
    # handshake that selects none); never the relay.bearer.<token> entry.
    chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None
    principal = svc.anonymous
    if svc.auth.enabled:
        token = websocket_token(websocket.headers, websocket.query_params, offered)
        try:
            principal = await svc.auth.verify(token)
        except AuthError as exc:
            svc.metrics.auth_failures.labels(reason="missing" if not token else "invalid").inc()
            # Accept, then close: a browser sees 1008 and the reason, not a bare failure.
            await websocket.accept(subprotocol=chosen)
            await websocket.close(CLOSE_POLICY, str(exc)[:120])
            return
    conn = Connection(
        websocket,
        svc.hub.tenant(principal.tenant),
        svc.config,
        svc.metrics,
        svc.actions.execute,
        turns=svc.turns,
        principal=principal,
        auth=svc.auth,
        subprotocol=chosen,
        limits=svc.limits,
    )
    await conn.run()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    status: dict[str, Any] = svc.hub.status()
    try:
        await asyncio.wait_for(svc.hub.control.ping(), 1.0)
        redis_ok = True
    except Exception:
        redis_ok = False
    status["redis"] = redis_ok
    ready = redis_ok and svc.hub.ready
    status["status"] = "ready" if ready else "unavailable"
    return JSONResponse(status, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    svc = services(request)
    if not svc.auth.metrics_allowed(request.headers.get("authorization")):
        # With auth on, /metrics needs Bearer <auth.metrics_token> (none set: never served).
        return HttpRefusal(401, "unauthorized", "/metrics needs the auth.metrics_token").response()
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, services(request).config.limits.max_body_bytes)  # limits
    if not raw:
        return {}
    # The same checks as a WebSocket frame (nesting depth, unpaired
    # surrogates), so a body that could not be answered is refused up front.
    return load_object(raw)


def _error(exc: CommandError) -> JSONResponse:
    codes = {"no_pending_decision": 409, "unavailable": 503, "forbidden": 403, **HTTP_STATUS}
    status = codes.get(exc.code, 400)
    # limits: an over-limit body may be partly unread, so the connection is not
    # reused; a rate-limited caller is told when to retry.
    frame = exc.frame()
    headers = {"connection": "close"} if status == 413 else {}
    if status == 429:
        headers["retry-after"] = str(math.ceil(frame.get("retry_after", 1)))
    return JSONResponse(frame, status_code=status, headers=headers)


async def cancel_route(request: Request) -> Response:
    svc = services(request)
    try:
        require_json(request)
        principal = await svc.principal(request)
        body = await _json_body(request)
        command = {**body, "type": "cancel_agent", "agent_id": request.path_params["target_id"]}
        # limits: cancels per subject
        svc.limits.check_cancel(subject_key(principal.sub, request.client))
        reply = await svc.actions.execute_raw(command, principal)
    except HttpRefusal as refusal:
        return refusal.response()
    except CommandError as exc:
        return _error(exc)
    return JSONResponse(reply, status_code=202)


async def budget_route(request: Request) -> Response:
    svc = services(request)
    try:
        require_json(request)
        principal = await svc.principal(request)
        body = await _json_body(request)
        decision = body.get("decision")
        if decision not in ("continue", "stop"):
            raise CommandError("invalid_field", "field 'decision' must be 'continue' or 'stop'")
        command = {
            **body,
            "type": f"budget_{decision}",
            "request_id": request.path_params["request_id"],
        }
        reply = await svc.actions.execute_raw(command, principal)
    except HttpRefusal as refusal:
        return refusal.response()
    except CommandError as exc:
        return _error(exc)
    return JSONResponse(reply, status_code=202)


def create_app(config: GlobalConfig | None = None) -> Starlette:
    """Build the gateway app. ``config`` defaults to :func:`relay.config.load_config`.

    >>> app = create_app(load_config())  # then serve it: uvicorn.run(app, port=8000)
    """
    cfg = config if config is not None else load_config()
    auth = Authenticator.from_config(cfg)  # a jwt mode without a key fails here, at startup
    registries: list[Metrics] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not auth.enabled:
            log.warning(
                "auth.mode is 'none': anyone who reaches this gateway reads every event of "
                "tenant %r and may cancel its agents and answer its budget pauses",
                cfg.redis.tenant,
            )
        commands, control, pubsub = _redis_clients(cfg)
        registry = Metrics()
        registries[:] = [registry]
        hub = Hub(cfg, commands, pubsub, registry, control=control)
        actions = Actions(cfg, commands, registry)
        app.state.services = Services(
            cfg,
            commands,
            hub,
            registry,
            actions,
            SendTurns(),
            auth,
            anonymous_principal(cfg),
            Limits.of(cfg),
        )
        await hub.start()
        reaper = _reaper(cfg, commands, registry, hub.gateway_id)
        if reaper is not None:
            await reaper.start()
        shedder = OverloadShedder(cfg.gateway, app.state.services.turns, registry)
        await shedder.start()
        try:
            yield
        finally:
            await shedder.close()
            if reaper is not None:
                await reaper.close()
            await hub.close()
            await commands.aclose()
            await control.aclose()
            await pubsub.aclose()

    drain = Drain()
    """Ends the open HTTP streams (SSE, Durable Streams live reads) when relay/gateway/serve.py
    starts the shutdown, so their clients reconnect elsewhere at once."""
    routes = [
        WebSocketRoute("/ws/events", events_ws),
        Route("/sse/events", events_sse, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/agui/requests/{request_id}", agui_route, methods=["POST"]),
        Route("/api/v1/agents/{target_id}/cancel", cancel_route, methods=["POST"]),
        Route("/api/v1/requests/{request_id}/budget", budget_route, methods=["POST"]),
        *durable_routes(drain.hooks),
        *console_routes(),
    ]
    allowed = cfg.auth.allowed_origins
    middleware = [
        # Outermost, so the send it keeps is the server's own (writer.py).
        Middleware(KeepServerSend),
        # The events socket skips the rest, CORS to router: for its whole
        # life it would be suspended in every layer (shortcut.py).
        Middleware(SocketShortcut, path="/ws/events", endpoint=events_ws, allowed=allowed),
        # Answers preflights of the listed origins (same-origin
        # calls need none). No credentials: tokens travel in Authorization.
        Middleware(
            CORSMiddleware,
            allow_origins=allowed,
            allow_methods=["GET", "POST", "HEAD"],
            # If-None-Match: Durable Streams revalidation; Last-Event-ID: a
            # cross-origin EventSource's reconnect.
            allow_headers=["Authorization", "Content-Type", "If-None-Match", "Last-Event-ID"],
            expose_headers=EXPOSED_HEADERS,  # the Durable Streams read API's headers
            allow_credentials=False,
            max_age=600,
        ),
        Middleware(OriginGuard, allowed=allowed, metrics=registries),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.drain = drain
    return app
