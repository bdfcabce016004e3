"""The HTTP side of ``POST /agui/requests/{request_id}``: refusals, then the SSE response.

Everything that can be refused is refused before the response starts, with
the REST routes' JSON errors (see docs/PROTOCOL.md, AG-UI); the stream
itself is an :class:`~relay.gateway.agui.AguiSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from relay.aio import stop_task
from relay.gateway.agui import SSE_HEADERS, AguiSession, Finished
from relay.gateway.auth import AuthError, Principal, bearer
from relay.gateway.guard import HttpRefusal, require_json
from relay.gateway.hub import HubUnavailable
from relay.gateway.limits import read_body, subject_key
from relay.logs import LogOnce
from relay.wire.agui_input import InputError, budget_answers, parse_input
from relay.wire.agui_map import Event
from relay.wire.commands import CommandError, load_object

if TYPE_CHECKING:
    from relay.gateway.app import Services

log = logging.getLogger(__name__)
log_once = LogOnce(log)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class AguiStream(Response):
    """The streaming response: runs the session until its run ends or the client leaves."""

    def __init__(self, session: AguiSession, first: list[Event], limit_key: str) -> None:
        super().__init__(status_code=200, headers=SSE_HEADERS)
        # A stream has no length: chunked transfer (Response sets content-length: 0).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.session, self.first, self.limit_key = session, first, limit_key
        self._released = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.session
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            s.send = send
            await s.write(self.first)
            if s.run.finished:
                return
            hold, s.hold = s.hold or deque(), None
            for env in hold:
                s.queue.push_event(env)
            tasks: list[asyncio.Future[Any]] = [
                asyncio.create_task(s.writer.run(), name="relay-agui-writer"),
                asyncio.create_task(s.done.wait(), name="relay-agui-done"),
                s.queue.overflowed(),
                asyncio.create_task(_disconnected(receive), name="relay-agui-disconnect"),
                asyncio.create_task(s.heartbeat(), name="relay-agui-heartbeat"),
                asyncio.create_task(s.expiry(), name="relay-agui-expiry"),
            ]
            failed = False
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = None if task.cancelled() else task.exception()
                    if exc is not None and not isinstance(exc, Finished | OSError):
                        failed = True
                        s.svc.metrics.internal_errors.labels(where="agui").inc()
                        log_once(f"agui:{type(exc).__name__}", "AG-UI stream failed", exc=exc)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    await stop_task(task)
            if not s.run.finished and (failed or s.queue.close_code is not None):
                # The hub's interest goes first: a client that reads nothing
                # may keep the last words waiting (as the WebSocket's close).
                await self._release()
                await self._last_words(failed)
        finally:
            await self._release()
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _release(self) -> None:
        s = self.session
        if not self._released:  # the synchronous part exactly once, even if cancelled below
            self._released = True
            s.queue.close()
            s.svc.limits.release(self.limit_key)  # limits
        await s.hub.unwatch(s.rid, s)  # idempotent

    async def _last_words(self, failed: bool) -> None:
        """Say why the run ends (overflow with policy ``close``, or a defect): the
        client starts another run, which resumes. A client that reads nothing
        is waited for at most ``gateway.ping_timeout``."""
        s = self.session
        if failed:
            words = s.run.error("relay.internal_error", "the gateway failed; start another run")
        else:
            words = s.run.error("relay.overflow", "too far behind; start another run")
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(s.svc.config.gateway.ping_timeout):
                await s.write(words)


async def _principal(svc: Services, request: Request) -> Principal:
    """The WebSocket's rules: ``Authorization: Bearer``, else ``?token=``; 401 without."""
    if not svc.auth.enabled:
        return svc.anonymous
    token = bearer(request.headers.get("authorization")) or request.query_params.get("token")
    if not token:
        svc.metrics.auth_failures.labels(reason="missing").inc()
        raise HttpRefusal(401, "unauthorized", "a bearer token is required")
    try:
        return await svc.auth.verify(token)
    except AuthError as exc:
        svc.metrics.auth_failures.labels(reason="invalid").inc()
        raise HttpRefusal(401, "invalid_token", str(exc)) from None


async def agui_route(request: Request) -> Response:
    """``POST /agui/requests/{request_id}``: body ``RunAgentInput``, answer an AG-UI SSE stream."""
    from relay.gateway.app import services

    svc = services(request)
    try:
        rid = str(uuid.UUID(request.path_params["request_id"]))
    except ValueError:
        return HttpRefusal(400, "invalid_uuid", "request_id is not a UUID").response()
    try:
        require_json(request)
        principal = await _principal(svc, request)
        principal.require("view", rid)
        raw = await read_body(request, svc.config.limits.max_body_bytes)  # limits
        run = parse_input(load_object(raw) if raw else {})
        budget_answers(run)  # a malformed answer is refused before anything happens
    except HttpRefusal as refusal:
        return refusal.response()
    except InputError as exc:
        return HttpRefusal(400, "invalid_field", str(exc)).response()
    except CommandError as exc:
        from relay.gateway.app import _error

        return _error(exc)
    key = subject_key(principal.sub, request.client)
    if (refused := svc.limits.admit(key)) is not None:  # limits: connections
        return JSONResponse(
            {"type": "error", "code": "too_many_connections", "message": refused},
            status_code=503,
            headers={"retry-after": "1"},
        )
    session = AguiSession(svc, svc.hub.tenant(principal.tenant), principal, rid, run)
    try:
        first = await session.prepare()
    except BaseException as exc:
        session.queue.close()
        await session.hub.unwatch(rid, session)
        svc.limits.release(key)
        if isinstance(exc, HubUnavailable | RedisError):
            log.info("AG-UI attach to %s failed: %s", rid, exc)
            return HttpRefusal(503, "unavailable", "Redis is unavailable; try again").response()
        if isinstance(exc, InputError):
            return HttpRefusal(400, "invalid_field", str(exc)).response()
        if isinstance(exc, CommandError):
            return HttpRefusal(409, exc.code, exc.message).response()
        raise
    return AguiStream(session, first, key)
