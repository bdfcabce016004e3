"""The README's claims about the gateway's pub/sub connection, proven black-box.

Each test runs real processes (redis-server, ``relay gateway``) and breaks
the network between them with :class:`tests.netproxy.NetProxy`; it looks only
at what WebSocket clients receive, ``/readyz``, ``/metrics`` and Redis itself,
so it holds however the gateway is built inside.

* A pub/sub socket that stays open but delivers nothing (a half-open
  connection after a failover or a NAT timeout) is noticed by the delivery
  probe, rebuilt, and every event published meanwhile still reaches every
  client exactly once, in order.
* Events published while the gateway was cut off from Redis reach every
  client even when nothing is published afterwards: only the backfill on
  reconnect can deliver them (a later event would let the per-client gap
  refill hide a missing backfill).
* A gateway subscribes the tenant-wide channel only while some local client
  wants every event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys
from tests.netproxy import NetProxy
from tests.support import Gateway, RedisServer, WsClient, eventually, metric, numsub, seqs

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def delta(text: str = "x") -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[NetProxy]:
    """A proxy in front of the test's redis-server; gateways connect through ``proxy.url``."""
    with NetProxy(redis_server.port) as p:
        yield p


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    return gw.get("/readyz")


# ------------------------------------------------------------------ delivery probe


async def test_a_subscriber_socket_that_stays_open_but_delivers_nothing_is_rebuilt(
    proxy: NetProxy, redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway(redis_url=proxy.url)
    rid = str(uuid.uuid4())
    burst = 30
    async with (
        WsClient(f"{gw.ws_url}?request_id={rid}") as narrow,
        WsClient(gw.ws_url) as fire,
        RelayClient.from_url(redis_server.url) as pub,
    ):
        for client in (narrow, fire):
            await client.request({"type": "ping"}, "pong")
        # One pub/sub connection for the whole process, through the proxy.
        assert proxy.count(pubsub=True) == 1
        await pub.publish(rid, delta("before"))
        for client in (narrow, fire):
            await client.wait_for(lambda c: seqs(c.frames, rid) == [1])
        failures = metric(gw, "relay_probe_failures_total")

        # The socket stays open and silent, and so does every one the gateway
        # opens instead until restore(): nothing errors, only the probe can tell.
        assert proxy.blackhole() == 1
        for i in range(burst):
            await pub.publish(rid, delta(f"while dark {i}"))
        await eventually(
            lambda: metric(gw, "relay_probe_failures_total") > failures, 5, "a probe failure"
        )
        status, body = readyz(gw)
        assert status == 503, body
        assert body["status"] == "unavailable"
        # Redis itself answers (commands go through fine): the probe is what failed.
        assert body["redis"] is True, body
        assert "probe_age_s" in body and "pubsub_connected" in body
        # The gateway rebuilds its connection; the new one is dead too, and
        # being subscribed is not enough to be ready: it must deliver.
        await eventually(lambda: proxy.blackholed >= 2, 5, "a rebuilt (and dead) connection")
        assert readyz(gw)[0] == 503
        assert seqs(narrow.frames, rid) == [1] and seqs(fire.frames, rid) == [1]

        proxy.restore()
        await eventually(lambda: readyz(gw)[0] == 200, 10, "readyz 200 after the rebuild")
        for client in (narrow, fire):
            await client.wait_for(lambda c: len(seqs(c.frames, rid)) >= burst + 1)
        for i in range(burst):
            await pub.publish(rid, delta(f"after {i}"))
        total = 2 * burst + 1
        for client in (narrow, fire):
            await client.wait_for(lambda c: total in seqs(c.frames, rid))
        for name, client in (("narrowed", narrow), ("firehose", fire)):
            assert seqs(client.frames, rid) == list(range(1, total + 1)), name
            assert not client.of_type("resync_required") and not client.of_type("error"), name
    # Each dead connection was found by the probe, and closed by the gateway
    # rather than left to leak.
    assert metric(gw, "relay_probe_failures_total") >= failures + 2
    await eventually(lambda: proxy.count(dead=True) == 0, 5, "dead sockets closed")
    assert proxy.count(pubsub=True) == 1


async def test_every_socket_half_open_after_a_failover_is_replaced_without_loss(
    proxy: NetProxy, redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """After a failover every existing socket is dead (both directions, nothing
    errors), while new connections work: commands time out, the probe notices
    the silent subscriber, and nothing published meanwhile is lost."""
    gw = start_gateway({"RELAY_REDIS_SOCKET_TIMEOUT": "1"}, redis_url=proxy.url)
    rid = str(uuid.uuid4())
    burst = 30
    async with (
        WsClient(f"{gw.ws_url}?request_id={rid}") as narrow,
        WsClient(gw.ws_url) as fire,
        RelayClient.from_url(redis_server.url) as pub,
    ):
        for client in (narrow, fire):
            await client.request({"type": "ping"}, "pong")
        await pub.publish(rid, delta("before"))
        for client in (narrow, fire):
            await client.wait_for(lambda c: seqs(c.frames, rid) == [1])
        failures = metric(gw, "relay_probe_failures_total")
        dead = proxy.blackhole(pubsub_only=False, both_directions=True, new_connections=False)
        assert dead >= 2  # the pub/sub connection and at least one command connection
        for i in range(burst):
            await pub.publish(rid, delta(f"while dark {i}"))
        await eventually(
            lambda: metric(gw, "relay_probe_failures_total") > failures, 10, "a probe failure"
        )
        await eventually(lambda: readyz(gw)[0] == 200, 15, "readyz 200 on new sockets")
        for client in (narrow, fire):
            await client.wait_for(lambda c: len(seqs(c.frames, rid)) >= burst + 1, timeout=15)
        for i in range(burst):
            await pub.publish(rid, delta(f"after {i}"))
        total = 2 * burst + 1
        for client in (narrow, fire):
            await client.wait_for(lambda c: total in seqs(c.frames, rid))
        for name, client in (("narrowed", narrow), ("firehose", fire)):
            assert seqs(client.frames, rid) == list(range(1, total + 1)), name
            assert not client.of_type("resync_required") and not client.of_type("error"), name


# ------------------------------------------------------------------ backfill on reconnect


async def test_events_published_during_an_outage_arrive_with_nothing_published_after(
    proxy: NetProxy, redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway({"RELAY_REDIS_SOCKET_TIMEOUT": "1"}, redis_url=proxy.url)
    # a: narrowed at connect; b: narrowed by command; c: new during the outage,
    # seen only by the firehose client; d: seen before, only by the firehose client.
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    n = 20
    async with (
        WsClient(f"{gw.ws_url}?request_id={a}") as on_a,
        WsClient(gw.ws_url) as on_b,
        WsClient(gw.ws_url) as fire,
        RelayClient.from_url(redis_server.url) as pub,
    ):
        await on_a.request({"type": "ping"}, "pong")
        assert (await on_b.request({"type": "subscribe", "request_id": b}, "subscribed"))[
            "type"
        ] == "subscribed"
        await fire.request({"type": "ping"}, "pong")
        for rid in (a, b, d):
            await pub.publish(rid, delta("before"))
        await on_a.wait_for(lambda cl: seqs(cl.frames, a) == [1])
        await on_b.wait_for(lambda cl: seqs(cl.frames, b) == [1])
        await fire.wait_for(lambda cl: all(seqs(cl.frames, r) == [1] for r in (a, b, d)))

        proxy.refuse(True)
        assert proxy.sever() >= 2  # at least the pub/sub and one command connection
        await eventually(lambda: readyz(gw)[0] == 503, 5, "readyz 503 during the outage")
        for rid in (a, b, c, d):
            for i in range(n):
                await pub.publish(rid, delta(f"during {i}"))
        # The gateway keeps trying and is turned away at least twice.
        refused = proxy.refused
        await eventually(lambda: proxy.refused >= refused + 2, 10, "refused reconnects")
        proxy.restore()
        # From here on nothing is published: no later event can reveal a gap.
        await eventually(lambda: readyz(gw)[0] == 200, 10, "readyz 200 after the outage")

        full = list(range(1, n + 2))
        expect: list[tuple[str, WsClient, str, list[int]]] = [
            ("narrowed a", on_a, a, full),
            ("narrowed b", on_b, b, full),
            ("firehose a", fire, a, full),
            ("firehose b", fire, b, full),
            ("firehose c", fire, c, list(range(1, n + 1))),
            ("firehose d", fire, d, full),
        ]
        for what, client, rid, want in expect:
            try:
                await client.wait_for(lambda cl, r=rid, w=want: len(seqs(cl.frames, r)) >= len(w))
            except TimeoutError:
                pytest.fail(f"{what}: got {seqs(client.frames, rid)}, want {want}")
        for what, client, rid, want in expect:
            assert seqs(client.frames, rid) == want, what
        for client in (on_a, on_b, fire):
            assert not client.of_type("resync_required") and not client.of_type("error")
        # The narrowed clients got only their own request.
        assert {f["request_id"] for f in on_a.events()} == {a}
        assert {f["request_id"] for f in on_b.events()} == {b}


# ------------------------------------------------------------------ tenant-wide channel


async def test_the_tenant_wide_channel_is_subscribed_only_while_a_client_wants_everything(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    keys = Keys("default")
    firehose = keys.firehose_channel
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert numsub(redis_server, firehose) == 0
    async with (
        WsClient(f"{gw.ws_url}?request_id={a}") as on_a,
        RelayClient.from_url(redis_server.url) as pub,
    ):
        await on_a.request({"type": "ping"}, "pong")
        assert numsub(redis_server, keys.request_channel(a)) == 1
        assert numsub(redis_server, firehose) == 0
        async with WsClient(gw.ws_url) as on_b:
            # Connected without a subscription (every event), then narrowed.
            reply = await on_b.request({"type": "subscribe", "request_id": b}, "subscribed")
            assert reply["type"] == "subscribed"
            await eventually(lambda: numsub(redis_server, firehose) == 0, 5, "firehose dropped")
            assert numsub(redis_server, keys.request_channel(b)) == 1
            # Narrowed clients are served without the tenant-wide channel.
            await pub.publish(a, delta())
            await pub.publish(b, delta())
            await on_a.wait_for(lambda c: seqs(c.frames, a) == [1])
            await on_b.wait_for(lambda c: seqs(c.frames, b) == [1])
            assert numsub(redis_server, firehose) == 0

            async with WsClient(gw.ws_url) as everything:
                await everything.request({"type": "ping"}, "pong")
                assert numsub(redis_server, firehose) == 1
                await pub.publish(b, delta())
                await everything.wait_for(lambda c: seqs(c.frames, b) == [2])
            await eventually(lambda: numsub(redis_server, firehose) == 0, 5, "firehose released")
            assert numsub(redis_server, keys.request_channel(b)) == 1
        await eventually(
            lambda: numsub(redis_server, keys.request_channel(b)) == 0, 5, "request b released"
        )
        assert numsub(redis_server, firehose) == 0
        assert numsub(redis_server, keys.request_channel(a)) == 1


async def test_viewers_leaving_together_neither_stall_the_next_client_nor_leak_a_channel(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """The last narrowed viewer of a request and the last firehose viewer leave
    at the same moment, again and again: each time the gateway lets go of the
    tenant-wide channel at once (not after ``redis.socket_timeout``, 5 s), the
    next client that wants every event is served at once, and once everyone
    has left the gateway holds no channel at all."""
    gw = start_gateway()
    keys = Keys("default")
    firehose = keys.firehose_channel
    rids: list[str] = []
    for _ in range(8):
        rid = str(uuid.uuid4())
        rids.append(rid)
        narrow, fire = WsClient(f"{gw.ws_url}?request_id={rid}"), WsClient(gw.ws_url)
        async with narrow, fire:
            for client in (narrow, fire):
                await client.request({"type": "ping"}, "pong")
        # Both sockets are closed; the gateway releases their interest concurrently.
        await eventually(lambda: numsub(redis_server, firehose) == 0, 2.0, "firehose released")
        async with WsClient(gw.ws_url) as nxt:
            await nxt.request({"type": "ping"}, "pong", timeout=2.0)
    await eventually(lambda: numsub(redis_server, firehose) == 0, 2.0, "firehose released")
    leaked = [r for r in rids if numsub(redis_server, keys.request_channel(r))]
    assert not leaked, f"request channels still subscribed with no viewer: {leaked}"
