"""Direct sends in a real gateway process, against a real redis-server.

Caught-up clients get their events written by the hub itself
(``relay_events_sent_direct_total``); a client whose socket is full makes a
direct send suspend, and its writer finishes it before anything else: every
event arrives once, in order, either way.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import websockets

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, WsClient, eventually, metric

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


AGENT = str(uuid.uuid4())


def delta(text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": AGENT, "text": text}


async def test_caught_up_clients_are_sent_directly_in_order(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    client = RelayClient.from_url(redis_server.url)
    clients = [WsClient(f"{gw.ws_url}?request_id={rid}") for _ in range(3)]
    try:
        for c in clients:
            await c.__aenter__()
            reply = await c.request({"type": "ping"}, "pong")
            assert reply["type"] == "pong"
        for i in range(100):
            await client.publish(rid, delta(f"t{i}"))  # one at a time: every writer parked
        for c in clients:
            await eventually(lambda c=c: len(c.events(rid)) == 100, 10, "every event")
            assert [f["seq"] for f in c.events(rid)] == list(range(1, 101))
        await eventually(lambda: metric(gw, "relay_events_sent_total") >= 300, 5, "counted")
        direct = metric(gw, "relay_events_sent_direct_total")
        assert 0 < direct <= metric(gw, "relay_events_sent_total")
    finally:
        for c in clients:
            await c.close()
        await client.aclose()


async def test_a_full_socket_suspends_a_direct_send_and_loses_nothing(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    client = RelayClient.from_url(redis_server.url)
    # A tiny receive buffer and a client that does not read: the gateway's
    # socket fills after a few events, and a direct send waits for room.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    ws = await websockets.connect(
        f"{gw.ws_url}?request_id={rid}", sock=sock, max_queue=1, max_size=None, compression=None
    )
    try:
        await ws.send(json.dumps({"type": "ping"}))
        first = [json.loads(await ws.recv())["type"] for _ in range(2)]
        assert first == ["subscribed", "pong"]
        text = "x" * 4000
        for i in range(300):  # 1.2 MB: far more than the socket buffers hold
            await client.publish(rid, delta(f"{i}:{text}"))
        seqs: list[int] = []
        while len(seqs) < 300:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["type"] == "agent_text_delta", frame  # no lagged: nothing dropped
            seqs.append(frame["seq"])
        assert seqs == list(range(1, 301))
    finally:
        await ws.close()
        await client.aclose()
