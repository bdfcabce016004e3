"""The peers relay is measured against, as small as each recipe gets.

Every peer subscribes to the same Redis channel relay's publish script
writes (``relay:<tenant>:req:{R}:events``, named by the ``channel`` query
parameter), strips the script's one-line header and sends the frame text,
unchanged, to every socket: the same bytes relay sends. Each sends
``{"type":"pong"}`` once a socket is subscribed (the load clients' "ready").

* :func:`ceiling`: a raw ASGI app with one pub/sub subscription for the whole
  process; the reader awaits ``websocket.send`` for every socket in turn.
  Nothing an ASGI app can do is cheaper: this is the floor of the interface.
* :func:`per_socket`: a raw ASGI app in which every socket has its own
  pub/sub subscription (the recipe without a broker in the process).
* :func:`sse_ceiling`: the ceiling over server-sent events.
* :func:`websockets_floor`: no ASGI at all: the ``websockets`` library's own
  server and ``websockets.broadcast`` (what is left below the interface).

Run one with uvicorn (``uvicorn benchmarks.fanout.peers:ceiling``) or
Granian; :func:`websockets_floor` with ``python -m benchmarks.fanout.peers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import redis.asyncio as aioredis

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PONG = '{"type":"pong"}'


def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def frame_of(data: bytes) -> str:
    """The frame text of a message of relay's publish script (header line dropped)."""
    return data.partition(b"\n")[2].decode()


class Fanout:
    """One pub/sub connection; channel -> the sockets' ``send`` callables."""

    def __init__(self) -> None:
        self.sockets: dict[str, list[Send]] = {}
        self.redis: aioredis.Redis | None = None
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.subscribed: dict[str, asyncio.Future[None]] = {}

    async def add(self, channel: str, send: Send) -> None:
        if self.pubsub is None:
            self.redis = aioredis.Redis.from_url(redis_url())
            self.pubsub = self.redis.pubsub()
        ready = self.subscribed.get(channel)
        if ready is None:
            # The first socket of a channel subscribes; the others that arrive
            # meanwhile wait for it (redis-py's reader must not start before
            # the first subscription exists: it would wait forever).
            ready = self.subscribed[channel] = asyncio.get_running_loop().create_future()
            await self.pubsub.subscribe(channel)
            if self.reader is None:
                self.reader = asyncio.create_task(self._read())
            ready.set_result(None)
        await ready
        self.sockets.setdefault(channel, []).append(send)

    def remove(self, channel: str, send: Send) -> None:
        targets = self.sockets.get(channel, [])
        if send in targets:
            targets.remove(send)

    async def _read(self) -> None:
        # A timeout, not ``timeout=None``: redis-py 8's blocking read sometimes
        # never returned the messages of channels subscribed meanwhile.
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg["type"] != "message":
                continue
            channel = msg["channel"].decode()
            out = {"type": "websocket.send", "text": frame_of(msg["data"])}
            for send in tuple(self.sockets.get(channel, ())):
                with contextlib.suppress(Exception):  # a socket closing under us
                    await send(out)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _channel(scope: Scope) -> str:
    query = parse_qs(scope.get("query_string", b"").decode())
    return str(query.get("channel", [""])[0])


async def _not_found(send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


_fanout = Fanout()


async def ceiling(scope: Scope, receive: Receive, send: Send) -> None:
    """One subscription per process; every event's text sent to every socket."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "websocket":
        await _not_found(send)
        return
    channel = _channel(scope)
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await _fanout.add(channel, send)
    await send({"type": "websocket.send", "text": PONG})
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        _fanout.remove(channel, send)


class _SseFanout(Fanout):
    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg["type"] != "message":
                continue
            channel = msg["channel"].decode()
            body = b"data: " + msg["data"].partition(b"\n")[2] + b"\n\n"
            out = {"type": "http.response.body", "body": body, "more_body": True}
            for send in tuple(self.sockets.get(channel, ())):
                with contextlib.suppress(Exception):
                    await send(out)


_sse = _SseFanout()


async def sse_ceiling(scope: Scope, receive: Receive, send: Send) -> None:
    """The ceiling over server-sent events (``GET /?channel=...``)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    channel = _channel(scope)
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await _sse.add(channel, send)
    body = f"data: {PONG}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": True})
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    finally:
        _sse.remove(channel, send)


async def per_socket(scope: Scope, receive: Receive, send: Send) -> None:
    """Every socket subscribes on its own pub/sub connection."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "websocket":
        await _not_found(send)
        return
    channel = _channel(scope)
    await receive()
    await send({"type": "websocket.accept"})
    client = _shared_client()
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await send({"type": "websocket.send", "text": PONG})

    async def forward() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                await send({"type": "websocket.send", "text": frame_of(msg["data"])})

    task = asyncio.create_task(forward())
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        task.cancel()
        # Waits for the forwarder without raising what ended it; a cancellation
        # of this handler itself still propagates (asyncio.wait does not catch it).
        await asyncio.wait([task])
        await pubsub.aclose()


_client: list[aioredis.Redis] = []


def _shared_client() -> aioredis.Redis:
    if not _client:
        _client.append(aioredis.Redis.from_url(redis_url()))
    return _client[0]


async def websockets_floor(port: int, deflate: bool) -> None:
    """The ``websockets`` library's own server and ``websockets.broadcast``: no ASGI."""
    import websockets
    from websockets.asyncio.server import ServerConnection, serve

    sockets: dict[str, set[ServerConnection]] = {}
    client = aioredis.Redis.from_url(redis_url())
    pubsub = client.pubsub()
    subscribed = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        channel = _channel({"query_string": path.partition("?")[2].encode()})
        if channel not in sockets:
            sockets[channel] = set()
            await pubsub.subscribe(channel)
            subscribed.set()
        sockets[channel].add(ws)
        await ws.send(PONG)
        try:
            await ws.wait_closed()
        finally:
            sockets[channel].discard(ws)

    async def read() -> None:
        await subscribed.wait()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                channel = msg["channel"].decode()
                websockets.broadcast(sockets.get(channel, set()), frame_of(msg["data"]))

    compression = "deflate" if deflate else None
    async with serve(
        handler, "127.0.0.1", port, compression=compression, max_size=None, ping_interval=None
    ):
        reader = asyncio.create_task(read())
        try:
            await asyncio.Future()  # until the process is stopped
        finally:
            reader.cancel()


if __name__ == "__main__":
    # python -m benchmarks.fanout.peers <port> [deflate] [uvloop]
    factory = None
    if "uvloop" in sys.argv[2:]:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(websockets_floor(int(sys.argv[1]), "deflate" in sys.argv[2:]))
