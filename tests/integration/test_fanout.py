"""Fan-out through real gateway processes: exactly once, in order, one pub/sub connection each.

Two ``relay gateway`` processes share one redis-server. Twenty WebSocket
clients are spread over them, some on the firehose (subscribed to nothing),
some narrowed to one or two requests, while several publishers, each with its
own :class:`RelayClient`, publish concurrently to several requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, WsClient

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def delta(text: str = "x") -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


def seqs(client: WsClient, rid: str) -> list[int]:
    return [f["seq"] for f in client.events(rid)]


async def ready_firehose(client: WsClient) -> None:
    """A firehose client is live once it answers: commands are read only after the
    connect-time subscription is live."""
    reply = await client.request({"type": "ping"}, "pong")
    assert reply["type"] == "pong"


async def subscribe(client: WsClient, rid: str, **extra: Any) -> dict[str, Any]:
    reply = await client.request({"type": "subscribe", "request_id": rid, **extra}, "subscribed")
    assert reply["type"] == "subscribed", reply
    return reply


def pubsub_clients(redis: RedisServer) -> list[dict[str, str]]:
    """The redis-server's clients that hold at least one channel or pattern."""
    clients = []
    for line in redis.command("CLIENT", "LIST").decode().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if int(fields.get("sub", "0")) > 0 or int(fields.get("psub", "0")) > 0:
            clients.append(fields)
    return clients


def local_ports(gateway: Gateway) -> set[int]:
    assert gateway.proc is not None
    proc = psutil.Process(gateway.proc.pid)
    return {c.laddr.port for c in proc.net_connections(kind="tcp") if c.raddr}


async def test_twenty_clients_two_gateways_exactly_once_in_order(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gateways = [start_gateway(), start_gateway()]
    rids = [str(uuid.uuid4()) for _ in range(4)]
    publishers, per_publisher = 4, 40  # events per publisher per request
    total = publishers * per_publisher

    # 20 clients, alternating gateways: 8 firehose, 6 on one request, 6 on two.
    clients = [WsClient(gateways[i % 2].ws_url) for i in range(20)]
    wants: list[list[str]] = []
    for i in range(20):
        if i < 8:
            wants.append([])
        elif i < 14:
            wants.append([rids[i % 4]])
        else:
            wants.append([rids[i % 4], rids[(i + 1) % 4]])
    for client in clients:
        await client.__aenter__()
    try:
        for client, want in zip(clients, wants, strict=True):
            if not want:
                await ready_firehose(client)
            for rid in want:
                reply = await subscribe(client, rid, command_id=f"sub-{rid[:8]}")
                assert reply["command_id"] == f"sub-{rid[:8]}"
                assert reply["seq"] == 0 and reply["epoch"] is None

        async def publisher(index: int) -> None:
            rng = random.Random(index)
            plan = [rid for rid in rids for _ in range(per_publisher)]
            rng.shuffle(plan)
            async with RelayClient.from_url(redis_server.url) as client:
                i = 0
                while i < len(plan):
                    rid = plan[i]
                    # A mix of single publishes and atomic batches of one request.
                    run = 1
                    while i + run < len(plan) and plan[i + run] == rid and run < 5:
                        run += 1
                    if run == 1:
                        await client.publish(rid, delta(f"p{index}-{i}"))
                    else:
                        await client.publish_many(rid, [delta(f"p{index}-{i}")] * run)
                    i += run

        await asyncio.gather(*(publisher(p) for p in range(publishers)))

        def complete(client: WsClient, want: list[str]) -> bool:
            targets = want or rids
            return all(len(client.events(r)) >= total for r in targets)

        for client, want in zip(clients, wants, strict=True):
            await client.wait_for(lambda c, w=want: complete(c, w), timeout=20)
        for n, (client, want) in enumerate(zip(clients, wants, strict=True)):
            for rid in rids:
                got = seqs(client, rid)
                if not want or rid in want:
                    assert got == list(range(1, total + 1)), f"client {n} request {rid}"
                else:
                    assert got == [], f"client {n} got events of {rid} it did not subscribe to"
            assert not client.of_type("error") and not client.of_type("lagged")

        # Exactly one subscribed Redis connection per gateway process, whatever
        # number of clients and channels it serves.
        holders = pubsub_clients(redis_server)
        assert len(holders) == 2, holders
        owners: list[int] = []
        for holder in holders:
            port = int(holder["addr"].rsplit(":", 1)[1])
            owners.extend(i for i, gw in enumerate(gateways) if port in local_ports(gw))
        assert sorted(owners) == [0, 1], (holders, owners)
        # Each holds its probe channel and the tenant-wide channel only: that
        # one carries the narrowed requests too, so no event is received twice.
        assert all(int(h["sub"]) == 2 for h in holders), holders
    finally:
        for client in clients:
            await client.close()


async def test_unsubscribe_stops_delivery(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    keep, drop = str(uuid.uuid4()), str(uuid.uuid4())
    async with WsClient(gw.ws_url) as client, RelayClient.from_url(redis_server.url) as pub:
        await subscribe(client, keep)
        await subscribe(client, drop)
        await pub.publish(drop, delta())
        await pub.publish(keep, delta())
        await client.wait_for(lambda c: len(c.events(keep)) == 1 and len(c.events(drop)) == 1)

        reply = await client.request(
            {"type": "unsubscribe", "request_id": drop, "command_id": 7}, "unsubscribed"
        )
        assert reply == {"type": "unsubscribed", "request_id": drop, "command_id": 7}
        for _ in range(5):
            await pub.publish(drop, delta())
        # One pub/sub connection delivers in publish order: once the marker
        # published after them has arrived, nothing of `drop` is on its way.
        await pub.publish(keep, delta("marker"))
        await client.wait_for(lambda c: len(c.events(keep)) == 2)
        assert seqs(client, drop) == [1]
        assert seqs(client, keep) == [1, 2]
        # The channel of `drop` is released on the Redis side too.
        channels = redis_server.command("PUBSUB", "CHANNELS", "*").decode().split()
        assert any(keep in ch for ch in channels) and not any(drop in ch for ch in channels)

        # Unsubscribing the last request puts the client back on the firehose.
        await client.request({"type": "unsubscribe", "request_id": keep}, "unsubscribed")
        await ready_firehose(client)
        await pub.publish(drop, delta("firehose again"))
        await client.wait_for(lambda c: len(c.events(drop)) == 2)
        assert seqs(client, drop) == [1, 7]


async def test_workflow_filtering_and_firehose(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    run_a, run_b = str(uuid.uuid4()), str(uuid.uuid4())

    def step(run: str, name: str) -> dict[str, Any]:
        return {
            "type": "workflow_step_started",
            "run_id": run,
            "step_id": name,
            "step_name": name,
            "step_type": "llm",
        }

    async with (
        WsClient(gw.ws_url) as filtered,
        WsClient(gw.ws_url) as everything,
        RelayClient.from_url(redis_server.url) as pub,
    ):
        await ready_firehose(everything)
        await ready_firehose(filtered)
        reply = await filtered.request(
            {"type": "subscribe_workflow", "run_id": run_a, "command_id": "w"},
            "workflow_subscribed",
        )
        assert reply == {"type": "workflow_subscribed", "run_id": run_a, "command_id": "w"}

        await pub.publish(rid, step(run_a, "a1"))
        await pub.publish(rid, step(run_b, "b1"))
        await pub.publish(rid, delta("not a workflow event"))
        await pub.publish(rid, step(run_a, "a2"))
        await everything.wait_for(lambda c: len(c.events(rid)) == 4)
        await filtered.wait_for(lambda c: any(f.get("step_id") == "a2" for f in c.frames))
        got = [(f["type"], f.get("step_id")) for f in filtered.events(rid)]
        assert got == [
            ("workflow_step_started", "a1"),
            ("agent_text_delta", None),
            ("workflow_step_started", "a2"),
        ]
        # The unfiltered client got every event of the request in order.
        assert seqs(everything, rid) == [1, 2, 3, 4]

        # unsubscribe_workflow sends no reply (as the original); ping orders it.
        before = len(filtered.frames)
        await filtered.send({"type": "unsubscribe_workflow", "run_id": run_a})
        await filtered.request({"type": "ping"}, "pong")
        assert [f["type"] for f in filtered.frames[before:]] == ["pong"]
        await pub.publish(rid, step(run_b, "b2"))
        await filtered.wait_for(lambda c: any(f.get("step_id") == "b2" for f in c.frames))


async def test_malformed_input_gets_error_frames_and_keeps_connection(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway({"RELAY_GATEWAY_MAX_MESSAGE_BYTES": "4096"})
    rid = str(uuid.uuid4())
    cases: list[tuple[str | bytes, str, Any]] = [
        ("{not json", "invalid_json", None),
        ("[1, 2, 3]", "invalid_json", None),
        ('"a string"', "invalid_json", None),
        ('{"type": "launch_missiles", "command_id": "c1"}', "unknown_type", "c1"),
        ('{"command_id": 5}', "missing_field", 5),
        ('{"type": "cancel_agent", "command_id": "c2"}', "missing_field", "c2"),
        (
            '{"type": "cancel_agent", "agent_id": "not-a-uuid", "command_id": "c3"}',
            "invalid_uuid",
            "c3",
        ),
        ('{"type": "subscribe", "request_id": "1234", "command_id": 9}', "invalid_uuid", 9),
        ('{"type": "subscribe", "request_id": "%s", "after_seq": -1}' % rid, "invalid_field", None),
        (
            '{"type": "budget_continue", "request_id": "%s", "command_id": "c4"}' % rid,
            "no_pending_decision",
            "c4",
        ),
        (json.dumps({"type": "ping", "pad": "x" * 8000}), "frame_too_large", None),
        (b"\xff\xfe\x00binary", "invalid_json", None),
        (b"x" * 8000, "frame_too_large", None),
    ]
    async with WsClient(gw.ws_url) as client:
        await ready_firehose(client)
        for raw, code, command_id in cases:
            before = len(client.frames)
            await client.ws.send(raw)
            await client.wait_for(lambda c, b=before: len(c.frames) > b)
            frame = client.frames[before]
            assert frame["type"] == "error", (raw, frame)
            assert frame["code"] == code, (raw, frame)
            assert isinstance(frame["message"], str) and frame["message"]
            assert frame.get("command_id") == command_id, (raw, frame)
            # The connection is still usable after every bad frame.
            pong = await client.request({"type": "ping", "command_id": "after"}, "pong")
            assert pong == {"type": "pong", "command_id": "after"}
        assert client.close_code is None and not client.closed.is_set()
        # The message names the bad field.
        uuid_errors = [f for f in client.of_type("error") if f["code"] == "invalid_uuid"]
        assert "agent_id" in uuid_errors[0]["message"]
        assert "request_id" in uuid_errors[1]["message"]


async def test_health_and_disconnect_cancels_nothing(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    assert gw.get("/healthz")[0] == 200
    status, body = gw.get("/readyz")
    assert status == 200 and body["status"] == "ready" and body["pubsub_connected"] is True

    rid = str(uuid.uuid4())
    agent = str(uuid.uuid4())
    async with RelayClient.from_url(redis_server.url) as pub:
        await pub.publish(
            rid,
            {
                "type": "agent_spawned",
                "agent_id": agent,
                "parent_id": None,
                "task_description": "root",
                "depth": 0,
                "index": 0,
                "total": 1,
            },
        )
        async with WsClient(gw.ws_url) as narrowed, WsClient(gw.ws_url) as firehose:
            await subscribe(narrowed, rid, after_seq=0)
            await ready_firehose(firehose)
            await narrowed.wait_for(lambda c: len(c.events(rid)) == 1)

        # Both are gone; the gateway drops their interest and nothing else.
        def released() -> bool:
            channels = redis_server.command("PUBSUB", "CHANNELS", "*").decode().split()
            return (
                not any(rid in ch for ch in channels)
                and gw.get("/readyz")[1]["firehose_connections"] == 0
            )

        deadline = asyncio.get_running_loop().time() + 10
        while not released():
            assert asyncio.get_running_loop().time() < deadline, "interest not released"
            await asyncio.sleep(0.05)
        assert redis_server.command("--scan", "--pattern", "*cancel*").strip() == b""
        assert await pub.redis.exists(f"relay:default:cancel:{{{agent}}}") == 0
        assert await pub.redis.exists(f"relay:default:cancel:{{{rid}}}") == 0
    assert gw.get("/readyz")[0] == 200
