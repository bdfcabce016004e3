"""Server-Sent Events: ``GET /sse/events`` serves a request's events over plain HTTP.

The same :class:`~relay.gateway.connection.Connection` serves it as a
WebSocket client: the same hub subscription, the same bounded
:class:`~relay.gateway.sendqueue.SendQueue` and overflow policy, the same
ordered writer (duplicates skipped, holes refilled from history,
``resync_required`` when history no longer covers one), the same limits and
token expiry. Only the framing differs:

* :class:`SseSocket` is the "socket" the connection writes to: an ASGI
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
:class:`Connection` subclass over an :class:`SseSocket` with
:func:`serve_stream`.

Example (a browser)::

    const es = new EventSource(`/sse/events?request_id=${rid}&token=${token}`);
    es.addEventListener("agent_text_delta", (e) => render(JSON.parse(e.data)));
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any, cast

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.aio import stop_task
from relay.gateway.auth import AuthError, Principal, websocket_token
from relay.gateway.connection import Connection
from relay.gateway.envelope import Envelope
from relay.gateway.guard import HttpRefusal
from relay.gateway.limits import subject_key
from relay.gateway.writer import OrderedWriter, dumps
from relay.wire.commands import CommandError, Subscribe, parse_command

if TYPE_CHECKING:
    from relay.gateway.app import Services

CONTENT_TYPE = "text/event-stream; charset=utf-8"
STREAM_HEADERS = [
    (b"content-type", CONTENT_TYPE.encode()),
    # Proxies and CDNs must neither cache nor buffer a live stream.
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
HEARTBEAT = b": heartbeat\n\n"
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
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


def sse_message(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE message: optional ``id:`` and ``event:`` lines, the data, a blank line.

    >>> sse_message('{"type":"pong"}', event="pong", event_id="e:1")
    b'id: e:1\\nevent: pong\\ndata: {"type":"pong"}\\n\\n'
    """
    head = ""
    if event_id is not None:
        head = f"id: {event_id}\n"
    if event:
        head += f"event: {event}\n"
    if "\n" in data or "\r" in data:
        # JSON from another publisher may be pretty-printed: one data line
        # per line (the browser joins them with \n, which JSON reads the same).
        body = "".join(f"data: {line}\n" for line in data.splitlines())
    else:
        body = f"data: {data}\n"
    return f"{head}{body}\n".encode()


def frame_type(text: str) -> str:
    """The ``type`` of a frame's JSON text (control frames put it first)."""
    if text.startswith('{"type":"'):
        end = text.find('"', 9)
        if end > 9:
            return text[9:end]
    try:
        obj = json.loads(text)
    except ValueError:
        return "message"
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) and kind.isidentifier() else "message"


class Drain:
    """The open HTTP streams of one app, ended together when the gateway shuts down.

    uvicorn waits for running responses before it stops, and a stream never
    finishes by itself: without this, every SSE client held the shutdown for
    ``gateway.drain_timeout`` and then saw its connection cut.
    """

    def __init__(self) -> None:
        self._streams: set[SseSocket] = set()
        self.draining = False

    def add(self, stream: SseSocket) -> None:
        """Track ``stream`` (ended at once when the gateway is already draining)."""
        self._streams.add(stream)
        if self.draining:
            stream.end(CLOSE_SERVICE_RESTART, "gateway shutting down; reconnect")

    def discard(self, stream: SseSocket) -> None:
        """``stream`` is over."""
        self._streams.discard(stream)

    def start(self) -> None:
        """End every stream: its client reconnects (through the balancer, elsewhere)."""
        self.draining = True
        for stream in list(self._streams):
            stream.end(CLOSE_SERVICE_RESTART, "gateway shutting down; reconnect")

    def __len__(self) -> int:
        return len(self._streams)


class SseSocket:
    """An ASGI ``text/event-stream`` response, written to like a WebSocket by a Connection.

    ``accept`` starts the response, ``send_bytes`` writes an already framed
    chunk, ``receive`` returns a disconnect once the client left or the
    stream was ended, ``close`` sends a ``close`` event and ends the response.
    Every send is bounded by ``stall_timeout``: a client that reads nothing
    for that long is dropped, so what it costs stays the bounded queue plus
    the socket buffer. :meth:`finish` must be awaited once the connection ran.
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        request_id: str,
        query: QueryParams,
        client: Any,
        retry_ms: int,
        heartbeat_interval: float,
        stall_timeout: float,
        drain: Drain | None = None,
    ) -> None:
        self.request_id = request_id
        self.query_params = query
        self.client = client
        self.application_state = WebSocketState.CONNECTING
        self._receive = receive
        self._send = send
        self._retry_ms = retry_ms
        self._heartbeat = heartbeat_interval
        self._stall = stall_timeout
        self._drain = drain
        self._ended = asyncio.Event()
        self._end_with = (CLOSE_NORMAL, "stream ended")
        self._broken = False
        """A send stalled past the timeout: nothing more can be written."""
        self._writing = 0
        self._last_write = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- what Connection calls

    async def accept(self, subprotocol: str | None = None) -> None:
        """Start the response (200, event-stream headers) and send ``retry:``."""
        await self._send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        self.application_state = WebSocketState.CONNECTED
        self._tasks = [
            asyncio.create_task(self._listen(), name="relay-sse-listen"),
            asyncio.create_task(self._beat(), name="relay-sse-heartbeat"),
        ]
        if self._drain is not None:
            self._drain.add(self)
        await self.send_bytes(f"retry: {self._retry_ms}\n\n".encode())

    async def receive(self) -> dict[str, Any]:
        """Wait until the stream is over (clients send nothing on it)."""
        await self._ended.wait()
        return {"type": "websocket.disconnect", "code": self._end_with[0]}

    async def send_bytes(self, chunk: bytes) -> None:
        """Write one framed chunk; ``WebSocketDisconnect`` once the client stalled."""
        if self._broken:
            raise WebSocketDisconnect(CLOSE_GOING_AWAY)
        self._writing += 1
        try:
            # uvicorn waits for the socket to drain *before* writing, so a
            # send cancelled here has written nothing: framing stays whole.
            async with asyncio.timeout(self._stall):
                await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            self._broken = True
            self.end(CLOSE_GOING_AWAY, "client stopped reading")
            raise WebSocketDisconnect(CLOSE_GOING_AWAY) from None
        finally:
            self._writing -= 1
            self._last_write = time.monotonic()

    async def send_text(self, text: str) -> None:
        """Write a frame as an SSE message named after its type (no id)."""
        await self.send_bytes(sse_message(text, event=frame_type(text)))

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a ``close`` event (the WebSocket's close code and reason) and end the response."""
        if self.application_state != WebSocketState.CONNECTED:
            return
        self.application_state = WebSocketState.DISCONNECTED
        self.end(code, reason)
        if self._broken:
            return  # nothing can be written; the server drops the socket
        frame = dumps({"type": "close", "code": code, "reason": reason})
        try:
            await self.send_bytes(sse_message(frame, event="close"))
            async with asyncio.timeout(self._stall):
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except (WebSocketDisconnect, TimeoutError):
            self._broken = True

    # ---------------------------------------------------------------- ours

    def end(self, code: int, reason: str) -> None:
        """Ask for the stream to end (the connection then releases everything)."""
        if not self._ended.is_set():
            self._end_with = (code, reason)
            self._ended.set()

    async def finish(self) -> None:
        """Stop this stream's tasks and complete the response if it is still open."""
        if self._drain is not None:
            self._drain.discard(self)
        for task in self._tasks:
            await stop_task(task)
        await self.close(*self._end_with)

    async def _listen(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.end(CLOSE_GOING_AWAY, "client left")
                return

    async def _beat(self) -> None:
        # A comment line when nothing was written for a heartbeat interval:
        # proxies cut responses idle for their read timeout (HAProxy's
        # `timeout server`, nginx's proxy_read_timeout).
        while True:
            wait = self._last_write + self._heartbeat - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self._writing:
                await asyncio.sleep(self._heartbeat)  # a send is under way (or stalled)
                continue
            try:
                await self.send_bytes(HEARTBEAT)
            except WebSocketDisconnect:
                return


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


async def serve_stream(
    sock: SseSocket, kind: type[Connection], svc: Services, principal: Principal
) -> None:
    """Serve one HTTP stream with a connection of ``kind`` until it ends."""
    conn = kind(
        cast(WebSocket, sock),  # the subset of a WebSocket a Connection uses
        svc.hub.tenant(principal.tenant),
        svc.config,
        svc.metrics,
        svc.actions.execute,
        turns=svc.turns,
        principal=principal,
        auth=svc.auth,
        limits=svc.limits,
    )
    try:
        await conn.run()
    finally:
        await sock.finish()


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
