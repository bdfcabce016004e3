"""One gateway serves many tenants: the cross-tenant matrix.

Three tenants, two gateways with auth on, on each gateway per tenant one
client of the tenant-wide stream and one subscribed to a request; an
orchestrator per tenant publishes to a request of its own and to a request
id all three tenants use. No event, command or history may cross a tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from relay.orchestrator.client import RelayClient
from tests.integration.test_auth import auth_env, http, spawned, token
from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

TENANTS = ("t1", "t2", "t3")
EVENTS = 20


def texts(client: WsClient) -> list[str]:
    return [f["text"] for f in client.frames if f.get("type") == "agent_text_delta"]


def tenant_keys(r: redis.Redis, tenant: str) -> dict[bytes, bytes]:
    """Every key of ``tenant`` with a digest of its value (what a leaked command would change)."""
    return {k: r.dump(k) or b"" for k in r.scan_iter(f"relay:{tenant}:*")}


async def test_cross_tenant_matrix(
    start_gateway: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    gws = [start_gateway(auth_env()), start_gateway(auth_env())]
    own = {t: str(uuid.uuid4()) for t in TENANTS}
    shared = str(uuid.uuid4())  # the same request id in every tenant
    agents = {t: str(uuid.uuid4()) for t in TENANTS}
    async with contextlib.AsyncExitStack() as stack:
        pubs = {
            t: await stack.enter_async_context(RelayClient.from_url(redis_server.url, tenant=t))
            for t in TENANTS
        }
        for t in TENANTS:
            await pubs[t].publish(shared, spawned(agents[t]))
        # Gateway 0: per tenant a tenant-wide client and one narrowed to its
        # own request. Gateway 1: per tenant only a client narrowed to its own
        # request and to the shared id, so nothing but the channel each
        # message came on can tell the tenants' shared-id events apart.
        wide: dict[tuple[str, int], WsClient] = {}
        narrow: dict[tuple[str, int], WsClient] = {}
        for t in TENANTS:
            for g, gw in enumerate(gws):
                url = f"{gw.ws_url}?token={token(t)}"
                if g == 0:
                    wide[t, g] = await stack.enter_async_context(WsClient(url))
                    assert (await wide[t, g].request({"type": "ping"}, "pong"))["type"] == "pong"
                narrow[t, g] = await stack.enter_async_context(WsClient(url + "&stream=none"))
                for rid in (own[t], shared) if g == 1 else (own[t],):
                    reply = await narrow[t, g].request(
                        {"type": "subscribe", "request_id": rid, "after_seq": 0}, "subscribed"
                    )
                    assert reply["type"] == "subscribed"
        await eventually(
            lambda: gws[0].get("/readyz")[1].get("firehose_connections") == 3,
            10,
            "every tenant's tenant-wide stream to be live",
        )

        async def orchestrate(t: str) -> None:
            for i in range(EVENTS):
                for rid, kind in ((own[t], "own"), (shared, "shared")):
                    text = f"{t}:{kind}:{i}"
                    event = {"type": "agent_text_delta", "agent_id": agents[t], "text": text}
                    await pubs[t].publish(rid, event)

        await asyncio.gather(*(orchestrate(t) for t in TENANTS))
        expected = {
            (t, g): [f"{t}:own:{i}" for i in range(EVENTS)]
            + ([f"{t}:shared:{i}" for i in range(EVENTS)] if g == 1 else [])
            for t in TENANTS
            for g in (0, 1)
        }
        for client in wide.values():
            await client.wait_for(lambda c: len(texts(c)) >= 2 * EVENTS)
        for key, client in narrow.items():
            want = len(expected[key])
            await client.wait_for(lambda c, n=want: len(texts(c)) >= n)
        for client in [*wide.values(), *narrow.values()]:  # a barrier: all sent before pong
            assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
        # Zero leaked events: every frame a client got is its own tenant's.
        for (t, g), client in [*wide.items(), *narrow.items()]:
            assert all(x.startswith(f"{t}:") for x in texts(client)), (t, g, texts(client))
            spawns = {f["agent_id"] for f in client.frames if f.get("type") == "agent_spawned"}
            assert spawns <= {agents[t]}, (t, g)
        for key, client in narrow.items():
            assert sorted(texts(client)) == sorted(expected[key]), key
        for (t, _), client in wide.items():
            assert len(texts(client)) == 2 * EVENTS, t

        # Zero leaked history: another tenant's request id is, here, an empty request.
        r = redis.Redis.from_url(redis_server.url)
        before = {t: tenant_keys(r, t) for t in TENANTS}
        probe = narrow["t1", 1]
        seen = len(probe.frames)
        reply = await probe.request(
            {"type": "subscribe", "request_id": own["t2"], "after_seq": 0, "snapshot": True},
            "subscribed",
        )
        assert (reply["type"], reply["seq"]) == ("subscribed", 0)
        snap = await probe.request({"type": "ping"}, "pong")  # everything before it was sent
        assert snap["type"] == "pong"
        got = [f for f in probe.frames[seen:] if f.get("request_id") == own["t2"]]
        assert all(f["type"] in ("subscribed", "snapshot") for f in got), got
        assert all(not f.get("agents") for f in got if f["type"] == "snapshot"), got

        # Zero leaked commands: t1 cancelling t2's agent and answering t2's budget
        # acts in t1's key space only.
        ack = await probe.request({"type": "cancel_agent", "agent_id": agents["t2"]}, "ack")
        assert ack["type"] == "ack"
        ack = await probe.request({"type": "cancel_agent", "agent_id": own["t3"]}, "ack")
        assert ack["type"] == "ack"
        answer = await probe.request({"type": "budget_continue", "request_id": own["t2"]}, "ack")
        assert answer["code"] == "no_pending_decision"
        status, reply = gws[0].post(f"/api/v1/agents/{agents['t3']}/cancel", {})
        assert status == 401  # REST needs a token too
        after = {t: tenant_keys(r, t) for t in TENANTS}
        assert after["t2"] == before["t2"] and after["t3"] == before["t3"]
        assert r.exists(f"relay:t1:cancel:{{{agents['t2']}}}")
        r.close()

        # Listings are per tenant.
        for t in TENANTS:
            listing = _listing(gws[1], token(t))
            assert {x["request_id"] for x in listing} == {own[t], shared}

    # One pub/sub connection per gateway, whatever the number of tenants.
    pubsub_clients = redis_server.command("CLIENT", "LIST", "TYPE", "pubsub").decode()
    assert len(pubsub_clients.strip().splitlines()) == len(gws)


def _listing(gw: Gateway, bearer: str) -> list[dict[str, Any]]:
    status, _, body = http(
        gw.http + "/api/v1/requests", headers={"authorization": f"Bearer {bearer}"}
    )
    assert status == 200, body
    items: list[dict[str, Any]] = body["requests"]
    return items
