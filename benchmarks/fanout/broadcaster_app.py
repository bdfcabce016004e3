"""encode/broadcaster's recipe with Starlette, run in a virtualenv of its own.

The documented pattern: one ``Broadcast`` (one pub/sub connection per
process), ``async with broadcast.subscribe(channel)`` per socket, and a
``send_text`` of every event. The peer strips the publish script's header
line so that clients get the same frame text as from relay. Pinned versions
(see ``BROADCASTER_PINS`` in ``benchmarks/fanout/systems.py``): broadcaster
0.3.1 delivers nothing with redis-py 8.x, so it runs with redis-py 5.0.8.

Run: ``BENCH_REDIS_URL=... uvicorn benchmarks.fanout.broadcaster_app:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcaster import Broadcast  # type: ignore[import-not-found, unused-ignore]
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


async def events(websocket: WebSocket) -> None:
    channel = websocket.query_params["channel"]
    await websocket.accept()
    async with broadcast.subscribe(channel=channel) as subscriber:
        await websocket.send_text('{"type":"pong"}')
        async for event in subscriber:
            await websocket.send_text(event.message.partition("\n")[2])


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = Starlette(routes=[WebSocketRoute("/ws", events)], lifespan=lifespan)
