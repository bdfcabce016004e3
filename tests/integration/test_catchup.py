"""Compact catch-up through real processes: late joiners render the text from one frame.

A real redis-server and ``relay gateway`` processes; a publisher streams
text deltas for several agents while WebSocket clients join mid-stream with
``snapshot=1``, then follow live. Each must end with every agent's text
exactly once (the snapshot's text, cut to the gateway's bound, then the live
deltas after ``text_seq``), and clients that never ask for a snapshot must
see the same stream as before.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys
from tests.support import Gateway, RedisServer, WsClient

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
BOUND = 1500


def spawned(agent: str, parent: str | None, index: int, total: int) -> dict[str, Any]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
            "task_description": f"agent {index}", "depth": 0 if parent is None else 1,
            "index": index, "total": total}  # fmt: skip


def completed(agent: str) -> dict[str, Any]:
    return {"type": "agent_completed", "agent_id": agent, "result_summary": "ok",
            "tokens_used": 1, "duration_ms": 1}  # fmt: skip


def piece(agent_index: int, i: int) -> str:
    # Multi-byte characters, so the bound cuts inside one now and then.
    return f"{agent_index}:{i}é€😀 "


async def follow(client: WsClient, root: str) -> dict[str, Any]:
    """Wait until the root agent's completion arrived; return the client's snapshot."""
    await client.wait_for(
        lambda c: any(f.get("type") == "agent_completed" and f.get("agent_id") == root
                      for f in c.frames), 60)  # fmt: skip
    (snap,) = client.of_type("snapshot")
    return snap


def check_rendered(client: WsClient, snap: dict[str, Any], full: dict[str, str], rid: str) -> None:
    """The snapshot's text plus the live deltas after it is each agent's text, once."""
    live = [f for f in client.events(rid) if f["type"] == "agent_text_delta"]
    assert all(f["seq"] > snap["text_seq"] for f in live), "a delta of the snapshot came again"
    assert snap["text_seq"] == snap["seq"]
    for agent, text in full.items():
        got = snap["texts"].get(agent, {"text": "", "truncated": False, "bytes": 0})
        tail = "".join(f["text"] for f in live if f["agent_id"] == agent)
        assert len(got["text"].encode()) <= BOUND
        before = text[: len(text) - len(tail)]
        assert text.endswith(tail)
        assert got["bytes"] == len(before.encode())
        if got["truncated"]:
            assert got["bytes"] > BOUND and before.endswith(got["text"])
            assert len(got["text"].encode()) > BOUND - 4  # cut at a character, no sooner
        else:
            assert got["text"] == before


async def test_late_joiners_render_each_text_once_then_follow_live(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gateways = [start_gateway({"RELAY_SNAPSHOT_TEXT_MAX_BYTES": str(BOUND)}) for _ in range(2)]
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    agents = [str(uuid.uuid4()) for _ in range(5)]
    full = dict.fromkeys(agents, "")
    clients: list[WsClient] = []
    async with RelayClient.from_url(redis_server.url) as pub:
        await pub.publish(rid, spawned(root, None, 0, 1))
        await pub.publish_many(rid, [spawned(a, root, i, len(agents))
                                     for i, a in enumerate(agents)])  # fmt: skip
        try:
            for step in range(300):
                batch = []
                for k, agent in enumerate(agents):
                    text = piece(k, step)
                    full[agent] += text
                    batch.append({"type": "agent_text_delta", "agent_id": agent, "text": text})
                if step % 2:
                    await pub.publish_many(rid, batch)
                else:
                    for event in batch:
                        await pub.publish(rid, event)
                if step % 40 == 5:
                    # A late joiner, on either gateway, while the text streams.
                    url = f"{gateways[len(clients) % 2].ws_url}?request_id={rid}&snapshot=1"
                    client = WsClient(url)
                    await client.__aenter__()
                    clients.append(client)
                await asyncio.sleep(0)
            for agent in [*agents, root]:
                await pub.publish(rid, completed(agent))
            for client in clients:
                check_rendered(client, await follow(client, root), full, rid)
            assert len(clients) == 8
            assert any(c.of_type("snapshot")[0]["texts"][agents[0]]["truncated"] for c in clients)
            assert not clients[0].of_type("snapshot")[0]["texts"][agents[0]]["truncated"]
        finally:
            for client in clients:
                await client.close()

    # Joined after the end: the whole request from the snapshot alone.
    async with WsClient(f"{gateways[0].ws_url}?request_id={rid}&snapshot=1") as late:
        await late.wait_for(lambda c: c.of_type("snapshot"))
        (snap,) = late.of_type("snapshot")
        for agent, text in full.items():
            got = snap["texts"][agent]
            assert got["truncated"] and got["bytes"] == len(text.encode())
            assert text.endswith(got["text"]) and len(got["text"].encode()) <= BOUND


async def test_clients_without_a_snapshot_see_the_stream_as_before(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """Resume replays the very frames in history; a snapshot differs only by its new fields."""
    default = start_gateway()
    no_text = start_gateway({"RELAY_SNAPSHOT_TEXT_MAX_BYTES": "0"})
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    async with RelayClient.from_url(redis_server.url) as pub:
        await pub.publish(rid, spawned(root, None, 0, 1))
        await pub.publish_many(
            rid, [{"type": "agent_text_delta", "agent_id": root, "text": f"t{i} "}
                  for i in range(200)])  # fmt: skip
    r: Any = aioredis.Redis.from_url(redis_server.url)  # replies typed loosely, as bytes
    try:
        entries = await r.xrange(Keys().request(rid).history)
    finally:
        await r.aclose()
    history = [json.loads(fields[b"f"]) for _, fields in entries]
    url = f"{default.ws_url}?request_id={rid}&after_seq=50"
    async with WsClient(url) as resumed:
        await resumed.wait_for(lambda c: len(c.events(rid)) == 151)
        assert resumed.events(rid) == history[50:]
        assert not resumed.of_type("snapshot")

    snaps = []
    for gw in (default, no_text):
        async with WsClient(f"{gw.ws_url}?request_id={rid}&snapshot=1") as c:
            await c.wait_for(lambda c: c.of_type("snapshot"))
            snaps.append(c.of_type("snapshot")[0])
    with_text, without = snaps
    assert without["texts"] == {}
    assert with_text["texts"][root]["text"] == "".join(f"t{i} " for i in range(200))
    old = {k: v for k, v in with_text.items() if k != "texts"}
    assert old == {k: v for k, v in without.items() if k != "texts"}
    assert {"agents", "budget", "pending_decision", "outcome", "seq", "epoch"} <= set(old)
