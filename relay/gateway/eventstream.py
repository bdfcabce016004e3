"""One ``text/event-stream`` response over ASGI, written to like a WebSocket.

:class:`SseSocket` is what a :class:`~relay.gateway.connection.Connection`
writes to when its client reads over plain HTTP: it starts the response,
sends ``retry:`` first and heartbeat comments when quiet, bounds every send
by a stall timeout (a client that reads nothing is dropped, so what it costs
stays its bounded send queue plus the socket buffer), and ends the response
with a ``close`` event carrying the WebSocket close code. :class:`Drain`
ends every open stream of an app when the gateway shuts down.

Any HTTP streaming transport reuses these: give a Connection subclass a
writer that frames messages with :func:`sse_message` (see
:mod:`relay.gateway.sse`) and run it with :func:`serve_stream`.

Example::

    sock = SseSocket(receive, send, request_id=rid, query=query, client=None,
                     retry_ms=1000, heartbeat_interval=15.0, stall_timeout=20.0)
    await serve_stream(sock, SseConnection, services, principal)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from starlette.datastructures import QueryParams
from starlette.types import Receive, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.aio import stop_task
from relay.gateway.auth import Principal
from relay.gateway.connection import Connection
from relay.gateway.writer import dumps

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
        self.hooks: list[Callable[[], None]] = []
        """Also called by :meth:`start`: other transports' streams (Durable Streams reads)."""

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
        for hook in self.hooks:
            hook()

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


__all__ = [
    "CLOSE_SERVICE_RESTART",
    "CONTENT_TYPE",
    "Drain",
    "SseSocket",
    "frame_type",
    "serve_stream",
    "sse_message",
]
