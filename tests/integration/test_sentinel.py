"""relay on a Sentinel-managed master: a forced failover mid-stream.

A master, its replica and three Sentinels (real processes); a gateway, a
publisher and a cancel listener all configured with nothing but
``redis+sentinel://s1,s2,s3/mymaster``. ``SENTINEL FAILOVER`` promotes the
replica while events stream; afterwards every client holds every event the
new master kept, in order, and a cancel still reaches the orchestrator.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import RedisConfig
from relay.orchestrator.cancel import CancelRegistry
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys, probe_channel
from tests.integration.topology_support import SentinelGroup
from tests.support import Gateway, RedisServer, WsClient, eventually, metric, numsub

KEYS = Keys()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "sentinel").start()
    yield group
    group.stop()


def delta() -> dict[str, Any]:
    # A fresh agent id per event: it identifies the event across the failover.
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": "x"}


def kept(server: RedisServer, rid: str) -> list[tuple[int, str]]:
    """(seq, agent_id) of every event the server's history holds for ``rid``."""
    raw = server.command("--json", "XRANGE", KEYS.request(rid).history, "-", "+")
    entries = json.loads(raw or b"[]")
    out = []
    for entry_id, fields in entries:
        frame = json.loads(dict(zip(fields[::2], fields[1::2], strict=True))["f"])
        out.append((int(entry_id.split("-")[0]), frame["agent_id"]))
    return out


def since_reset(client: WsClient, rid: str) -> list[dict[str, Any]]:
    """``rid``'s events after the last ``resync_required`` for it (all without one).

    Writes the old master took after the promotion are lost with it; a
    gateway that forwarded some moves the request to a new epoch and tells its
    clients to start over, then serves the stream the new master kept."""
    frames = client.frames
    resets = [
        i
        for i, f in enumerate(frames)
        if f.get("type") == "resync_required" and f.get("request_id") == rid
    ]
    tail = frames[resets[-1] + 1 :] if resets else frames
    return [f for f in tail if f.get("request_id") == rid and "seq" in f and "ts" in f]


async def test_forced_failover_mid_stream_loses_nothing_the_new_master_kept(
    sentinels: SentinelGroup, tmp_path: Path
) -> None:
    gw = Gateway(sentinels.url, tmp_path / "gateway.log").start()
    rids = [str(uuid.uuid4()) for _ in range(3)]
    config = RedisConfig(url=sentinels.url, publish_retry_seconds=30)
    assert config.mode == "sentinel"
    try:
        async with (
            RelayClient.from_config(config) as publisher,
            WsClient(gw.ws_url) as firehose,
            WsClient(gw.ws_url) as viewer,
        ):
            registry = CancelRegistry(publisher.redis, publisher.keys, poll_interval=1.0)
            await registry.start()
            try:
                await firehose.request({"type": "ping"}, "pong")
                reply = await viewer.request(
                    {"type": "subscribe", "request_id": rids[0]}, "subscribed"
                )
                assert reply["type"] == "subscribed", reply
                counts = dict.fromkeys(rids, 0)
                stop = asyncio.Event()

                async def stream() -> None:
                    while not stop.is_set():
                        for rid in rids:
                            counts[rid] = await publisher.publish(rid, delta())
                        await asyncio.sleep(0.01)

                task = asyncio.create_task(stream())
                try:
                    await eventually(lambda: counts[rids[0]] >= 20, 20, "events before")
                    old_port = sentinels.master_port()
                    before = metric(gw, "relay_redis_reconnects_total")
                    await asyncio.to_thread(sentinels.failover)
                    seen = counts[rids[0]]
                    await eventually(lambda: counts[rids[0]] >= seen + 20, 30, "events after")
                finally:
                    stop.set()
                    await task
                new = sentinels.replica if sentinels.replica.port != old_port else sentinels.master
                assert new.port == sentinels.master_port() != old_port

                # Both re-resolved the master: the gateway's subscription and the
                # cancel listener's are on the new one now, not left on the old
                # master (a replica relays publishes, so delivery alone would
                # not tell). Until then a write may still land on the old
                # master and be lost with it (docs/DEPLOYMENT.md).
                gateway_id = gw.get("/readyz")[1]["gateway_id"]
                probe = probe_channel("default", gateway_id)
                await eventually(lambda: numsub(new, probe) == 1, 20, "gateway on the new master")
                await eventually(
                    lambda: numsub(new, KEYS.cancel_channel) == 1, 20, "listener on the new master"
                )
                # A cancel through the gateway reaches the orchestrator.
                token = await registry.token(rids[1])
                status, _ = gw.post(f"/api/v1/agents/{rids[1]}/cancel", {})
                assert status in (200, 202), status
                await asyncio.wait_for(token.wait(), 10)

                for rid in rids:
                    history = kept(new, rid)
                    assert history, "the new master kept the stream"
                    await firehose.wait_for(
                        lambda c, h=history, r=rid: (
                            {a for _, a in h} <= {f["agent_id"] for f in c.events(r)}
                        ),
                        20,
                    )
                history = kept(new, rids[0])
                await viewer.wait_for(
                    lambda c: {a for _, a in history} <= {f["agent_id"] for f in c.events(rids[0])},
                    20,
                )
            finally:
                await registry.close()
        for client, watched in ((firehose, rids), (viewer, rids[:1])):
            for rid in watched:
                order = {a: s for s, a in kept(new, rid)}
                got = [
                    order[f["agent_id"]] for f in since_reset(client, rid) if f["agent_id"] in order
                ]
                assert got == sorted(order.values()), "every kept event, once, in order"
        assert metric(gw, "relay_redis_reconnects_total") > before
        await eventually(gw.ready, 20, "gateway ready on the new master")
    finally:
        gw.stop()


async def test_subscribers_leave_a_master_the_sentinels_abandoned(
    sentinels: SentinelGroup, tmp_path: Path
) -> None:
    """The old master stays up and keeps its clients (the Sentinels cannot demote
    it: its REPLICAOF is refused, as when they are partitioned from it). Its
    subscribers still hear its own publishes, so nothing looks broken; the
    gateway and the cancel listener move to the new master because they ask
    the Sentinels where the master is."""
    old = sentinels.master
    old.command("ACL", "SETUSER", "default", "-replicaof", "-slaveof")
    gw = Gateway(sentinels.url, tmp_path / "gateway.log").start()
    try:
        async with RelayClient.from_config(RedisConfig(url=sentinels.url)) as client:
            registry = CancelRegistry(client.redis, client.keys, poll_interval=0.5)
            await registry.start()
            try:
                gateway_id = gw.get("/readyz")[1]["gateway_id"]
                probe = probe_channel("default", gateway_id)
                assert numsub(old, probe) == 1
                assert numsub(old, KEYS.cancel_channel) == 1
                await asyncio.to_thread(sentinels.failover)
                new = sentinels.replica
                assert "role:master" in old.command("INFO", "replication").decode()
                await eventually(lambda: numsub(new, probe) == 1, 20, "gateway on the new master")
                await eventually(
                    lambda: numsub(new, KEYS.cancel_channel) == 1, 20, "listener on the new master"
                )
                assert numsub(old, probe) == 0
                await eventually(gw.ready, 20, "gateway ready on the new master")
            finally:
                await registry.close()
    finally:
        gw.stop()
