"""The gateway's Starlette application: routes and lifespan.

``create_app(config)`` is the factory uvicorn (and the tests) run. The
lifespan owns the Redis clients and the :class:`Hub`; nothing is created at
import time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .. import redisconn
from ..commands import CommandError, load_object
from ..config import GlobalConfig, load_config
from .actions import Actions
from .connection import Connection
from .hub import Hub
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .static import console_routes
from .writer import SendTurns


@dataclass(slots=True)
class Services:
    """What the routes share; built by the lifespan, one per process."""

    config: GlobalConfig
    redis: Redis
    hub: Hub
    metrics: Metrics
    actions: Actions
    turns: SendTurns


def _redis_clients(config: GlobalConfig) -> tuple[Redis, Redis, Redis]:
    # Built by relay/redisconn.py from [redis], like every Redis client relay uses.
    return (
        redisconn.command_client(config),
        redisconn.control_client(config),
        redisconn.pubsub_client(config),
    )


def services(scope_holder: Request | WebSocket) -> Services:
    """The :class:`Services` of the running app."""
    svc: Services = scope_holder.app.state.services
    return svc


async def events_ws(websocket: WebSocket) -> None:
    svc = services(websocket)
    conn = Connection(
        websocket, svc.hub, svc.config, svc.metrics, svc.actions.execute, turns=svc.turns
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
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    # The same checks as a WebSocket frame (nesting depth, unpaired
    # surrogates), so a body that could not be answered is refused up front.
    return load_object(raw)


def _error(exc: CommandError) -> JSONResponse:
    status = {"no_pending_decision": 409, "unavailable": 503}.get(exc.code, 400)
    return JSONResponse(exc.frame(), status_code=status)


async def cancel_route(request: Request) -> Response:
    svc = services(request)
    try:
        body = await _json_body(request)
        command = {**body, "type": "cancel_agent", "agent_id": request.path_params["target_id"]}
        reply = await svc.actions.execute_raw(command)
    except CommandError as exc:
        return _error(exc)
    return JSONResponse(reply, status_code=202)


async def budget_route(request: Request) -> Response:
    svc = services(request)
    try:
        body = await _json_body(request)
        decision = body.get("decision")
        if decision not in ("continue", "stop"):
            raise CommandError("invalid_field", "field 'decision' must be 'continue' or 'stop'")
        command = {
            **body,
            "type": f"budget_{decision}",
            "request_id": request.path_params["request_id"],
        }
        reply = await svc.actions.execute_raw(command)
    except CommandError as exc:
        return _error(exc)
    return JSONResponse(reply, status_code=202)


def create_app(config: GlobalConfig | None = None) -> Starlette:
    """Build the gateway app. ``config`` defaults to :func:`relay.config.load_config`."""
    cfg = config if config is not None else load_config()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        commands, control, pubsub = _redis_clients(cfg)
        registry = Metrics()
        hub = Hub(cfg, commands, pubsub, registry, control=control)
        actions = Actions(cfg, commands, registry)
        app.state.services = Services(cfg, commands, hub, registry, actions, SendTurns())
        await hub.start()
        try:
            yield
        finally:
            await hub.close()
            await commands.aclose()
            await control.aclose()
            await pubsub.aclose()

    routes = [
        WebSocketRoute("/ws/events", events_ws),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/v1/agents/{target_id}/cancel", cancel_route, methods=["POST"]),
        Route("/api/v1/requests/{request_id}/budget", budget_route, methods=["POST"]),
        *console_routes(),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
