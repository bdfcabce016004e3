"""The events WebSocket past Starlette's middleware stack: its frames, and its whole life.

Starlette hands a WebSocket down one coroutine per layer: the CORS
middleware, the origin guard, the exception middleware, the router, the route
and the route's exception wrapper. Each stays suspended, with its locals and
closures, for as long as the socket is open, and each wraps ``send`` once
more. Two costs follow, both paid per connection by a relay that holds
thousands:

* per frame sent: a coroutine per layer (:class:`KeepServerSend` leaves the
  server's own ``send`` in the scope, and writers send to it directly);
* per idle connection: about 5 KiB of suspended frames and closures, a sixth
  of what relay kept per idle connection (:class:`SocketShortcut` starts the
  events endpoint from here instead, once the origin guard's rule has let it
  through).

Neither layer does anything for this route that is lost: CORS and the
exception middleware pass WebSockets through, the endpoint raises no
``WebSocketException``, and an upgrade the origin guard refuses takes the
whole stack, where the guard refuses and counts it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from relay.gateway.guard import origin_set, scope_origin_allowed

SERVER_SEND = "relay.server_send"
"""Scope key under which :class:`KeepServerSend` leaves the server's ``send``."""


class KeepServerSend:
    """ASGI middleware, outermost: keeps a WebSocket's server ``send`` in its scope.

    A frame sent through Starlette's ``WebSocket.send`` passes its state checks
    and then one wrapper per layer of the middleware stack (exception handling
    at the app and at the route, the origin guard): a coroutine frame each,
    per frame sent, about a fifth of the gateway's profile with 1,000 clients.
    Writers send their frames straight to the server's ``send`` once the
    socket is accepted (:meth:`~relay.gateway.writer.OrderedWriter._write`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[SERVER_SEND] = send
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path the router matches: ``path`` without the ``root_path`` prefix."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :]
    return path


class SocketShortcut:
    """ASGI middleware, just inside :class:`KeepServerSend`: the WebSocket of
    ``path`` goes straight to ``endpoint`` when its origin is allowed."""

    def __init__(
        self,
        app: ASGIApp,
        path: str,
        endpoint: Callable[[WebSocket], Awaitable[None]],
        allowed: Iterable[str],
    ) -> None:
        self.app = app
        self.path = path
        self.endpoint = endpoint
        self.allowed = origin_set(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "websocket"
            and route_path(scope) == self.path
            and scope_origin_allowed(scope, self.allowed)
        ):
            await self.endpoint(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)
