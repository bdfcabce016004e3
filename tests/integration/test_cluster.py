"""relay on a three-master Redis Cluster: the core scenarios, with sharded pub/sub.

One cluster (three ``redis-server --cluster-enabled yes`` processes joined by
``redis-cli --cluster create``) and two gateway processes serve the whole
module; every test uses request ids of its own, spread so that each master
owns some. Orchestrators are ``relay simulate`` processes or
:class:`RelayClient` objects, all with ``RELAY_REDIS_MODE=cluster`` and a URL
naming one node.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import redisconn
from relay.config import RedisConfig
from relay.orchestrator.client import RelayClient
from relay.tools.simplan import build_plan
from relay.wire.keys import Keys, key_slot
from tests.integration.test_control import (
    NO_WARNING,
    PAUSING,
    STREAM,
    endings,
    events,
    finished,
    has,
    outcome,
    subscribe,
)
from tests.integration.topology_support import RedisClusterProcs, cli
from tests.support import (
    Gateway,
    RedisServer,
    RelayProcess,
    WsClient,
    eventually,
    metric,
    ws_clients,
)

CLUSTER_ENV = {"RELAY_REDIS_MODE": "cluster"}
KEYS = Keys()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster_gateways(
    redis_cluster: RedisClusterProcs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Gateway]]:
    logs = tmp_path_factory.mktemp("cluster-gateways")
    gateways = [Gateway(redis_cluster.url, logs / f"gw{i}.log", CLUSTER_ENV) for i in range(2)]
    try:
        for gw in gateways:
            gw.start()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()


@pytest.fixture
async def publisher(redis_cluster: RedisClusterProcs) -> AsyncIterator[RelayClient]:
    async with RelayClient.from_config(RedisConfig(mode="cluster", url=redis_cluster.url)) as c:
        yield c


@pytest.fixture
def simulators(redis_cluster: RedisClusterProcs, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL)


def simulate(
    started: list[RelayProcess], cluster: RedisClusterProcs, tmp: Path, rid: str, *args: str
) -> RelayProcess:
    proc = RelayProcess(
        ["simulate", "--request-id", rid, "--seed", "42", *args],
        {"RELAY_REDIS_URL": cluster.url, **CLUSTER_ENV},
        tmp / f"simulate-{len(started)}.log",
    )
    started.append(proc)
    return proc.start()


def rids_on_every_master(cluster: RedisClusterProcs, per_master: int) -> list[str]:
    """Request ids, ``per_master`` owned by each master."""
    want = {n.port: per_master for n in cluster.nodes}
    ports = cluster.slot_ports()
    found: list[str] = []
    while any(want.values()):
        rid = str(uuid.uuid4())
        port = ports[key_slot(rid)]
        if want[port]:
            want[port] -= 1
            found.append(rid)
    return found


def delta(text: str = "x") -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


def shardnumsub(node: RedisServer, channel: str) -> int:
    return int(cli(node.port, "PUBSUB", "SHARDNUMSUB", channel).split()[1])


def seq_list(client: WsClient, rid: str) -> list[int]:
    return [f["seq"] for f in client.events(rid)]


async def publish_all(publisher: RelayClient, rids: list[str], count: int) -> None:
    for _ in range(count):
        await asyncio.gather(*(publisher.publish(r, delta()) for r in rids))


# ---------------------------------------------------------------- fan-out


async def test_fan_out_over_three_masters_exactly_once_in_order(
    redis_cluster: RedisClusterProcs, cluster_gateways: list[Gateway], publisher: RelayClient
) -> None:
    gw1, gw2 = cluster_gateways
    rids = rids_on_every_master(redis_cluster, 2)
    firehoses = [WsClient(gw1.ws_url), WsClient(gw2.ws_url)]
    viewers = [WsClient((gw1, gw2)[i % 2].ws_url) for i in range(len(rids))]
    async with ws_clients([c.url for c in firehoses + viewers]) as opened:
        firehoses, viewers = opened[:2], opened[2:]
        for client in firehoses:
            assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
        for client, rid in zip(viewers, rids, strict=True):
            await subscribe(client, rid)
        await publish_all(publisher, rids, 40)
        for client in firehoses:
            await client.wait_for(lambda c: len(c.events()) == 40 * len(rids), 20)
        for client, rid in zip(viewers, rids, strict=True):
            await client.wait_for(lambda c, r=rid: len(c.events(r)) == 40, 20)

        # Each firehose shard is held on its owner only, by both gateways; no
        # request channel is (the tenant-wide stream carries those events).
        for rid in rids:
            owner = redis_cluster.owner(KEYS.request(rid).seq)
            for node in redis_cluster.nodes:
                expected = 2 if node is owner else 0
                assert shardnumsub(node, KEYS.firehose_shard(rid)) == expected
                assert shardnumsub(node, KEYS.request_channel(rid)) == 0
        # Nothing uses classic (broadcast) pub/sub.
        for node in redis_cluster.nodes:
            assert cli(node.port, "PUBSUB", "CHANNELS").split() == []

    for client in firehoses:
        for rid in rids:
            assert seq_list(client, rid) == list(range(1, 41))
    for client, rid in zip(viewers, rids, strict=True):
        assert seq_list(client, rid) == list(range(1, 41))
        assert {f["request_id"] for f in client.events()} == {rid}


async def test_resume_with_after_seq_on_another_gateway(
    redis_cluster: RedisClusterProcs, cluster_gateways: list[Gateway], publisher: RelayClient
) -> None:
    rid = rids_on_every_master(redis_cluster, 1)[2]
    for _ in range(30):
        await publisher.publish(rid, delta())
    url = f"{cluster_gateways[1].ws_url}?request_id={rid}&after_seq=12"
    async with WsClient(url) as client:
        await client.wait_for(lambda c: len(c.events(rid)) >= 18, 15)
        # The request channel is a shard channel, held on the owner only.
        owner = redis_cluster.owner(KEYS.request(rid).seq)
        for node in redis_cluster.nodes:
            expected = 1 if node is owner else 0
            assert shardnumsub(node, KEYS.request_channel(rid)) == expected
        for _ in range(10):
            await publisher.publish(rid, delta())
        await client.wait_for(lambda c: len(c.events(rid)) >= 28, 15)
    assert seq_list(client, rid) == list(range(13, 41))


# ---------------------------------------------------------------- control


async def test_cancel_of_an_agent_reaches_its_subtree_in_the_orchestrator(
    redis_cluster: RedisClusterProcs,
    cluster_gateways: list[Gateway],
    simulators: list[RelayProcess],
    tmp_path: Path,
) -> None:
    gw1, gw2 = cluster_gateways
    rid = str(uuid.uuid4())
    plan = build_plan(rid, agents=8, max_depth=3, deltas=30, tokens_per_delta=10, seed=42)
    target = next(a for a in plan.walk() if a.depth == 1 and a.batches)
    subtree = {a.agent_id for a in target.walk()}
    first_child = target.batches[0].agents[0].agent_id
    async with WsClient(gw1.ws_url) as viewer, WsClient(gw2.ws_url) as controller:
        await subscribe(viewer, rid)
        proc = simulate(
            simulators, redis_cluster, tmp_path, rid,
            "--agents", "8", "--depth", "3", *STREAM, *NO_WARNING,
        )  # fmt: skip
        await viewer.wait_for(has("agent_text_delta", rid, agent_id=first_child), 30)
        reply = await controller.request(
            {"type": "cancel_agent", "agent_id": target.agent_id}, "ack"
        )
        assert reply["type"] == "ack", reply
        assert outcome(await finished(proc)) == "completed"
        await viewer.wait_for(has("agent_completed", rid, agent_id=plan.agent_id), 10)
    ends = endings(viewer, rid)
    cancelled = {a for a, kind in ends.items() if kind == "agent_cancelled"}
    assert cancelled == subtree & set(ends)
    assert {target.agent_id, first_child} <= cancelled
    assert all(kind == "agent_completed" for a, kind in ends.items() if a not in subtree)


async def test_budget_pause_is_answered_through_the_cluster(
    redis_cluster: RedisClusterProcs,
    cluster_gateways: list[Gateway],
    simulators: list[RelayProcess],
    tmp_path: Path,
) -> None:
    gw1, gw2 = cluster_gateways
    rid = str(uuid.uuid4())
    async with WsClient(gw1.ws_url) as viewer, WsClient(gw2.ws_url) as answerer:
        await subscribe(viewer, rid)
        proc = simulate(simulators, redis_cluster, tmp_path, rid, *PAUSING,
                        "--decision-timeout", "30")  # fmt: skip
        await viewer.wait_for(has("budget_warning", rid), 30)
        reply = await answerer.request({"type": "budget_continue", "request_id": rid}, "ack")
        assert reply["type"] == "ack", reply
        await viewer.wait_for(
            has("budget_decision", rid, decision="continue", decided_by="client"), 10
        )
        assert outcome(await finished(proc)) == "completed"
    assert len(events(viewer, rid, "budget_decision")) == 1


# ---------------------------------------------------------------- topology changes


async def stream_until(
    publisher: RelayClient, rids: list[str], stop: asyncio.Event, counts: dict[str, int]
) -> None:
    """Publish to every request in turn until ``stop``; ``counts`` says how many landed."""
    while not stop.is_set():
        for rid in rids:
            counts[rid] = await publisher.publish(rid, delta())
        await asyncio.sleep(0.01)


async def test_a_moved_slot_is_followed_without_loss(
    redis_cluster: RedisClusterProcs, cluster_gateways: list[Gateway], publisher: RelayClient
) -> None:
    gw1, gw2 = cluster_gateways
    rids = rids_on_every_master(redis_cluster, 1)
    moving = rids[0]
    source = redis_cluster.owner(KEYS.request(moving).seq)
    target = next(n for n in redis_cluster.nodes if n is not source)
    before = [metric(gw, "relay_redis_reconnects_total") for gw in cluster_gateways]
    async with WsClient(gw1.ws_url) as firehose, WsClient(gw2.ws_url) as viewer:
        await firehose.request({"type": "ping"}, "pong")
        await subscribe(viewer, moving)
        stop, counts = asyncio.Event(), {r: 0 for r in rids}
        task = asyncio.create_task(stream_until(publisher, rids, stop, counts))
        try:
            await eventually(lambda: counts[moving] >= 20, 20, "events before the move")
            redis_cluster.move_slot(key_slot(moving), source, target)
            seen = counts[moving]
            await eventually(lambda: counts[moving] >= seen + 20, 20, "events after the move")
        finally:
            stop.set()
            await task
        for rid in rids:
            await firehose.wait_for(lambda c, r=rid: len(c.events(r)) >= counts[r], 20)
        await viewer.wait_for(lambda c: len(c.events(moving)) >= counts[moving], 20)
    assert shardnumsub(target, KEYS.request_channel(moving)) == 0  # viewer gone
    for rid in rids:
        assert seq_list(firehose, rid) == list(range(1, counts[rid] + 1))
    assert seq_list(viewer, moving) == list(range(1, counts[moving] + 1))
    after = [metric(gw, "relay_redis_reconnects_total") for gw in cluster_gateways]
    assert all(a > b for a, b in zip(after, before, strict=True)), "both links were rebuilt"
    # At once, on Redis's unsubscribe push for the moved slot (the periodic
    # re-read of the slot map would also notice, seconds later).
    for gw in cluster_gateways:
        assert "unsubscribed by Redis (slot moved)" in gw.output()


async def test_restart_of_one_master_mid_stream_loses_nothing(
    redis_cluster: RedisClusterProcs, cluster_gateways: list[Gateway], publisher: RelayClient
) -> None:
    gw1, gw2 = cluster_gateways
    rids = rids_on_every_master(redis_cluster, 1)
    victim = redis_cluster.owner(KEYS.request(rids[1]).seq)
    async with WsClient(gw1.ws_url) as firehose, WsClient(gw2.ws_url) as viewer:
        await firehose.request({"type": "ping"}, "pong")
        await subscribe(viewer, rids[1])
        stop, counts = asyncio.Event(), {r: 0 for r in rids}
        task = asyncio.create_task(stream_until(publisher, rids, stop, counts))
        try:
            await eventually(lambda: counts[rids[1]] >= 20, 20, "events before the restart")
            victim.restart()  # SIGTERM (AOF flushed), then the same port and directory
            seen = counts[rids[1]]
            await eventually(lambda: counts[rids[1]] >= seen + 20, 30, "events after the restart")
        finally:
            stop.set()
            await task
        for rid in rids:
            await firehose.wait_for(lambda c, r=rid: len(c.events(r)) >= counts[r], 30)
        await viewer.wait_for(lambda c: len(c.events(rids[1])) >= counts[rids[1]], 30)
    for rid in rids:
        assert seq_list(firehose, rid) == list(range(1, counts[rid] + 1))
    assert seq_list(viewer, rids[1]) == list(range(1, counts[rids[1]] + 1))
    for gw in cluster_gateways:
        await eventually(gw.ready, 20, f"gateway {gw.port} ready again")


async def test_a_burst_of_first_commands_on_a_new_client_all_succeed(
    redis_cluster: RedisClusterProcs,
) -> None:
    """As when clients reach a freshly started gateway: its command client's first
    commands all at once (redis-py closed connections under some of them)."""
    failures: list[BaseException] = []
    for _ in range(30):
        redis = redisconn.command_client(RedisConfig(mode="cluster", url=redis_cluster.url))
        rids = [str(uuid.uuid4()) for _ in range(13)]
        replies = await asyncio.gather(
            *(redis.mget([KEYS.request(r).seq, KEYS.request(r).epoch]) for r in rids),
            return_exceptions=True,
        )
        failures += [r for r in replies if isinstance(r, BaseException)]
        await redis.aclose()
    assert failures == []
