"""The events socket skips Starlette's stack, unless its origin is refused."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from relay.gateway.shortcut import KeepServerSend, SocketShortcut, route_path


class Layers:
    """An inner middleware that records the paths it saw."""

    seen: list[str] = []

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            Layers.seen.append(scope["path"])
        await self.app(scope, receive, send)


async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text("hello")
    await ws.close()


def app() -> Starlette:
    return Starlette(
        routes=[WebSocketRoute("/ws/events", endpoint), WebSocketRoute("/ws/other", endpoint)],
        middleware=[
            Middleware(KeepServerSend),
            Middleware(
                SocketShortcut, path="/ws/events", endpoint=endpoint, allowed=["https://ok"]
            ),
            Middleware(Layers),
        ],
    )


async def connect(path: str, origin: str | None = None, root_path: str = "") -> list[str]:
    """Play the server's part of one upgrade; the text frames the app sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    got: list[str] = []

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        if message["type"] == "websocket.send":
            got.append(message["text"])
        elif message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    headers = [(b"host", b"gw")] + ([(b"origin", origin.encode())] if origin else [])
    scope: Scope = {
        "type": "websocket",
        "path": path,
        "root_path": root_path,
        "headers": headers,
        "query_string": b"",
    }
    async with asyncio.timeout(5):
        await app()(scope, receive, send)
    return got


async def test_the_events_socket_skips_the_inner_layers() -> None:
    Layers.seen = []
    assert await connect("/ws/events") == ["hello"]
    assert await connect("/ws/events", origin="https://ok") == ["hello"]
    assert await connect("/relay/ws/events", root_path="/relay") == ["hello"]
    assert Layers.seen == []


async def test_other_sockets_and_refused_origins_take_the_whole_stack() -> None:
    # A refused origin goes down the stack, where the origin guard refuses and counts it.
    Layers.seen = []
    await connect("/ws/other")
    await connect("/ws/events", origin="https://elsewhere")
    assert Layers.seen == ["/ws/other", "/ws/events"]


def test_route_path_drops_the_root_path_as_the_router_does() -> None:
    assert route_path({"path": "/ws/events"}) == "/ws/events"
    assert route_path({"path": "/api/ws/events", "root_path": "/api"}) == "/ws/events"
    assert route_path({"path": "/apix/ws/events", "root_path": "/api"}) == "/apix/ws/events"
    assert route_path({"path": "/api", "root_path": "/api"}) == ""
