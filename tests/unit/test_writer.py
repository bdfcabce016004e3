"""The send path: frames go to the server's own ``send``, past the middleware's wrappers;
a gateway process tunes the cyclic collector."""

from __future__ import annotations

import asyncio
import uuid

import fakeredis
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import Begin, SendQueue, SendTurns
from relay.gateway.shortcut import SERVER_SEND, KeepServerSend
from relay.gateway.store import RequestStore
from relay.gateway.writer import OrderedWriter
from relay.wire.keys import Keys
from tests.unit.test_hardening import ordered_writer


class CountSends:
    """An inner middleware that counts the ``websocket.send`` messages it sees."""

    seen = 0

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting(message: Message) -> None:
            if message["type"] == "websocket.send":
                CountSends.seen += 1
            await send(message)

        await self.app(scope, receive, counting)


def writer_for(ws: WebSocket, queue: SendQueue) -> OrderedWriter:
    store = RequestStore(fakeredis.FakeAsyncRedis(), Keys())
    writer: OrderedWriter = ordered_writer(ws, queue, store, subscribed=True)
    return writer


async def serve_three(ws: WebSocket) -> None:
    await ws.accept()
    rid = str(uuid.uuid4())
    queue = SendQueue(100, 1 << 20, "drop_oldest", Metrics(), turns=SendTurns())
    queue.push_control(Begin(rid, "e", 0, ['{"type":"subscribed"}'], None))
    for seq in (1, 2, 3):
        queue.push_event(Envelope(rid, seq, "e", "agent_text_delta", f'{{"seq":{seq}}}'))
    writer = writer_for(ws, queue)
    task = asyncio.create_task(writer.run())
    await ws.receive_text()  # the client says it has them all
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ws.close()


def app(*outer: Middleware) -> Starlette:
    return Starlette(
        routes=[WebSocketRoute("/ws", serve_three)],
        middleware=[*outer, Middleware(CountSends)],
    )


async def talk(asgi: ASGIApp) -> list[str]:
    """Play the server's part: connect, collect four text frames, say done."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    got: list[str] = []
    inbox.put_nowait({"type": "websocket.connect"})

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        if message["type"] == "websocket.send":
            got.append(message["text"])
            if len(got) == 4:
                inbox.put_nowait({"type": "websocket.receive", "text": "done"})
        elif message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    scope: Scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    async with asyncio.timeout(5):
        await asgi(scope, receive, send)
    return got


FRAMES = ['{"type":"subscribed"}', '{"seq":1}', '{"seq":2}', '{"seq":3}']


async def test_frames_skip_the_middleware_and_arrive_in_order() -> None:
    CountSends.seen = 0
    assert await talk(app(Middleware(KeepServerSend))) == FRAMES
    assert CountSends.seen == 0  # every frame went to the server's send directly


async def test_without_the_server_send_frames_go_through_starlette() -> None:
    CountSends.seen = 0
    assert await talk(app()) == FRAMES
    assert CountSends.seen == 4


async def test_a_direct_send_keeps_starlettes_disconnect_rules() -> None:
    sent: list[Message] = []

    async def server_send(message: Message) -> None:
        if sent:
            raise OSError("peer gone")  # what uvicorn's ClientDisconnected is
        sent.append(message)

    async def receive() -> Message:
        raise AssertionError("not read")

    async def through_starlette(message: Message) -> None:
        raise AssertionError("frames must not go through Starlette here")

    scope: Scope = {"type": "websocket", "path": "/ws", "headers": [], SERVER_SEND: server_send}
    ws = WebSocket(scope, receive, through_starlette)
    ws.application_state = WebSocketState.CONNECTED
    writer = writer_for(ws, SendQueue(10, 1 << 20, "drop_oldest", Metrics()))
    await writer._emit_control("one")
    assert sent == [{"type": "websocket.send", "text": "one"}]
    with pytest.raises(WebSocketDisconnect):
        await writer._emit_control("two")  # the peer left: a disconnect, as Starlette says it
    assert ws.application_state is WebSocketState.DISCONNECTED
    with pytest.raises(WebSocketDisconnect):
        await writer._emit_control("three")  # closed: refused before any send
    assert len(sent) == 1


def test_a_gateway_process_collects_less_often_and_leaves_startup_out() -> None:
    import gc

    from relay.gateway.serve import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
