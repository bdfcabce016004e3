"""Server-Sent Events: ``GET /sse/events`` serves a request's events over plain HTTP.

The same :class:`~relay.gateway.connection.Connection` serves it as a
WebSocket client: the same hub subscription, the same bounded
:class:`~relay.gateway.sendqueue.SendQueue` and overflow policy, the same
ordered writer (duplicates skipped, holes refilled from history,
``resync_required`` when history no longer covers one), the same limits and
token expiry. Only the framing differs:

* :class:`~relay.gateway.eventstream.SseSocket` is the "socket" the
  connection writes to: an ASGI
  ``text/event-stream`` response that sends ``retry:`` first, heartbeat
  comments when quiet, ends the stream when the client stops reading for
  ``gateway.ping_timeout`` (the WebSocket's pong deadline), and ends it with
  a ``close`` event when the connection closes or the gateway shuts down;
* :class:`SseWriter` writes each event as ``id: <epoch>:<seq>``,
  ``event: <type>``, ``data: <the frame JSON, same text as on the WebSocket>``.
  Control frames carry the id of where the stream stands after them, so a
  browser that reconnects by itself sends ``Last-Event-ID`` and resumes
  exactly after the last frame it got.

Other HTTP streaming transports reuse both: subclass :class:`SseWriter` (or
:class:`~relay.gateway.writer.OrderedWriter`) for another framing, and run a
:class:`Connection` subclass over an ``SseSocket`` with
:func:`~relay.gateway.eventstream.serve_stream`.

Example (a browser)::

    const es = new EventSource(`/sse/events?request_id=${rid}&token=${token}`);
    es.addEventListener("agent_text_delta", (e) => render(JSON.parse(e.data)));
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from relay.gateway.auth import AuthError, Principal, websocket_token
from relay.gateway.connection import Connection
from relay.gateway.envelope import Envelope
from relay.gateway.eventstream import (
    CONTENT_TYPE,
    Drain,
    SseSocket,
    frame_type,
    serve_stream,
    sse_message,
)
from relay.gateway.guard import HttpRefusal
from relay.gateway.limits import subject_key
from relay.gateway.writer import OrderedWriter, dumps
from relay.wire.commands import CommandError, Subscribe, parse_command

if TYPE_CHECKING:
    from relay.gateway.app import Services

_EPOCH = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_SEQ = re.compile(r"[0-9]{1,18}")


class BadEventId(ValueError):
    """A ``Last-Event-ID`` that this gateway never sent."""


def encode_id(epoch: str | None, seq: int) -> str:
    """The SSE id of a position: ``<epoch>:<seq>`` (epoch empty before the request exists).

    >>> encode_id("a1b2c3d4e5f6", 42)
    'a1b2c3d4e5f6:42'
    """
    return f"{epoch or ''}:{seq}"


def decode_id(value: str) -> tuple[str | None, int]:
    """``(epoch, seq)`` of an id made by :func:`encode_id`; :class:`BadEventId` otherwise.

    >>> decode_id("a1b2c3d4e5f6:42")
    ('a1b2c3d4e5f6', 42)
    """
    epoch, sep, seq = value.rpartition(":")
    if not sep or not _SEQ.fullmatch(seq) or not _EPOCH.fullmatch(epoch):
        raise BadEventId("Last-Event-ID must be '<epoch>:<seq>' as sent in an event's id")
    return epoch or None, int(seq)


class SseWriter(OrderedWriter):
    """Writes a connection's queue as SSE messages whose ids resume exactly.

    An event's id is its own ``<epoch>:<seq>``; a control frame's is where
    the request's stream stands once the client has it (``subscribed`` after
    a resume from seq 57 carries ``:57``, a snapshot its seq, a
    ``resync_required`` the position it moved the stream to), so a browser
    that reconnects after any frame resumes after exactly that frame.
    """

    async def _emit(self, env: Envelope) -> None:
        message = sse_message(env.frame, event=env.type, event_id=f"{env.epoch}:{env.seq}")
        await self.ws.send_bytes(message)

    async def _emit_control(self, text: str) -> None:
        rid = cast(SseSocket, self.ws).request_id
        track = self.tracks.get(rid)
        event_id = None if track is None else encode_id(track.epoch, track.last or 0)
        await self.ws.send_bytes(sse_message(text, event=frame_type(text), event_id=event_id))


class SseConnection(Connection):
    """A :class:`Connection` that writes SSE messages."""

    writer_class = SseWriter


def stream_query(params: QueryParams, last_event_id: str | None) -> tuple[str, QueryParams]:
    """The request id and the subscription query of an SSE request.

    ``Last-Event-ID`` (a browser's reconnect) replaces ``after_seq``, ``epoch``
    and ``snapshot``: the client resumes after the last message it got.
    Raises :class:`HttpRefusal` (400) on a bad parameter or id.
    """
    rids = params.getlist("request_id")
    if len(rids) != 1:
        # One Last-Event-ID can resume one request's stream, not several.
        raise HttpRefusal(400, "invalid_field", "query parameter 'request_id': give exactly one")
    raw: dict[str, Any] = {"type": "subscribe", "request_id": rids[0]}
    for name in ("after_seq", "epoch"):
        if (value := params.get(name)) is not None:
            raw[name] = value
    if params.get("snapshot") in ("1", "true"):
        raw["snapshot"] = True
    if last_event_id is not None and last_event_id.strip():
        try:
            epoch, seq = decode_id(last_event_id.strip())
        except BadEventId as exc:
            raise HttpRefusal(400, "invalid_last_event_id", str(exc)) from None
        raw.pop("snapshot", None)
        raw.pop("epoch", None)
        raw["after_seq"] = seq
        if epoch is not None:
            raw["epoch"] = epoch
    try:
        command = parse_command(dumps(raw))
    except CommandError as exc:
        raise HttpRefusal(400, exc.code, f"query string: {exc.message}") from None
    assert isinstance(command, Subscribe)
    rid = str(command.request_id)
    query: dict[str, str] = {"request_id": rid}
    if command.after_seq is not None:
        query["after_seq"] = str(command.after_seq)
    if command.epoch is not None:
        query["epoch"] = command.epoch
    if command.snapshot:
        query["snapshot"] = "1"
    return rid, QueryParams(query)


async def stream_principal(request: Request, svc: Services) -> Principal:
    """Who an HTTP stream reads for: a token in ``Authorization`` or ``?token=`` (401 without)."""
    if not svc.auth.enabled:
        return svc.anonymous
    # EventSource cannot set headers: the token may come in the query string.
    token = websocket_token(request.headers, request.query_params, ())
    try:
        return await svc.auth.verify(token)
    except AuthError as exc:
        svc.metrics.auth_failures.labels(reason="missing" if not token else "invalid").inc()
        raise HttpRefusal(401, "invalid_token" if token else "unauthorized", str(exc)) from None


class SseResponse(Response):
    """Runs one :class:`SseConnection` as the response body."""

    def __init__(
        self, svc: Services, principal: Principal, request_id: str, query: QueryParams
    ) -> None:
        super().__init__()
        self.svc, self.principal, self.request_id, self.query = svc, principal, request_id, query

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc = self.svc
        gw = svc.config.gateway
        sock = SseSocket(
            receive,
            send,
            request_id=self.request_id,
            query=self.query,
            client=scope.get("client"),
            retry_ms=svc.config.sse.retry_ms,
            heartbeat_interval=svc.config.sse.heartbeat_interval,
            stall_timeout=gw.ping_timeout,
            drain=scope["app"].state.drain,
        )
        await serve_stream(sock, SseConnection, svc, self.principal)


async def events_sse(request: Request) -> Response:
    """``GET /sse/events?request_id=R[&after_seq=N&epoch=E][&snapshot=1][&token=T]``.

    Refusals come before the stream starts, as JSON: 400 (bad parameter or
    ``Last-Event-ID``), 401 (token), 403 (scope), 429/503 (connection limits).
    """
    svc: Services = request.app.state.services
    try:
        principal = await stream_principal(request, svc)
        rid, query = stream_query(request.query_params, request.headers.get("last-event-id"))
        try:
            principal.require("view", rid)
        except CommandError as exc:
            raise HttpRefusal(403, exc.code, exc.message) from None
        # limits: connections per process and per subject, answered before the stream
        refusal = svc.limits.refusal(subject_key(principal.sub, request.client))
        if refusal is not None:
            status, message = refusal
            raise HttpRefusal(status, "too_many_connections", message)
    except HttpRefusal as refused:
        response: JSONResponse = refused.response()
        if refused.status in (429, 503):
            response.headers["retry-after"] = "1"
        return response
    return SseResponse(svc, principal, rid, query)


__all__ = [
    "CONTENT_TYPE",
    "BadEventId",
    "Drain",
    "SseConnection",
    "SseResponse",
    "SseSocket",
    "SseWriter",
    "decode_id",
    "encode_id",
    "events_sse",
    "frame_type",
    "serve_stream",
    "sse_message",
    "stream_query",
]
