"""Cluster and Sentinel support without servers: config, slots, the sharded script, routing."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import fakeredis
import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot as redis_key_slot

from relay import redisconn
from relay.config import (
    ConfigError,
    GlobalConfig,
    LeaseConfig,
    RedisConfig,
    load_config,
    sentinel_url,
)
from relay.gateway.metrics import Metrics
from relay.gateway.pubsub import PubSubLink
from relay.gateway.reaper import Reaper
from relay.gateway.shardlink import ClusterLink, firehose_tenant
from relay.orchestrator.budget import RequestBudget, answer_budget
from relay.orchestrator.client import Published, RelayClient
from relay.wire.keys import SLOTS, Keys, key_slot, probe_channel, probe_shard, slot_tag
from relay.wire.scripts import PUBLISH_LINE, SHARDED_PUBLISH_LINE, LuaScript, script, script_names
from tests.unit.test_cancel_budget import open_pause

# ---------------------------------------------------------------- config


def load(**env: str) -> RedisConfig:
    return load_config(environ={f"RELAY_REDIS_{k.upper()}": v for k, v in env.items()}).redis


def test_cluster_mode_takes_any_node_url() -> None:
    rc = load(mode="cluster", url="redis://10.0.0.7:7000")
    assert (rc.mode, rc.effective_url) == ("cluster", "redis://10.0.0.7:7000")


def test_a_sentinel_url_alone_selects_sentinel_mode() -> None:
    rc = load(url="redis+sentinel://user:p%40ss@s1:26379,s2:26380/prod/2")
    assert rc.mode == "sentinel"
    address = sentinel_url(rc.effective_url)
    assert address.sentinels == [("s1", 26379), ("s2", 26380)]
    assert (address.master, address.db, address.username, address.password) == (
        "prod", 2, "user", "p@ss",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "key", "message"),
    [
        ({"mode": "clustered"}, "redis.mode", "'standalone', 'cluster' or 'sentinel'"),
        ({"mode": "cluster", "url": "redis://a:1/3"}, "redis.url", "database 0 only"),
        ({"mode": "cluster", "url": "unix:///r.sock"}, "redis.url", "url of a node"),
        ({"mode": "sentinel", "url": "redis://a:1"}, "redis.url", "redis+sentinel://"),
        ({"mode": "sentinel"}, "redis.url", "redis+sentinel://"),
        ({"mode": "standalone", "url": "redis+sentinel://a:1/m"}, "redis.url", "needs redis.mode"),
        ({"url": "redis+sentinel://a:1"}, "redis.url", "names no master"),
        ({"url": "redis+sentinel://a:1,b/m"}, "redis.url", "'b' is not host:port"),
    ],
)
def test_bad_topology_settings_name_the_key(env: dict[str, str], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(**env)
    assert key in str(err.value) and message in str(err.value), str(err.value)


def test_a_sentinel_url_is_logged_without_its_password() -> None:
    url = "redis+sentinel://app:secret@s1:26379,s2:26379/prod"
    assert redisconn.redacted_url(url) == "redis+sentinel://app:***@s1:26379,s2:26379/prod"
    assert redisconn.redacted_url("redis+sentinel://s1:1/m") == "redis+sentinel://s1:1/m"


def test_clients_follow_the_mode() -> None:
    cluster = redisconn.client(RedisConfig(mode="cluster", url="redis://127.0.0.1:7000"))
    sentinel = redisconn.client(RedisConfig(url="redis+sentinel://127.0.0.1:26379/m"))
    plain = redisconn.client(RedisConfig(url="redis://127.0.0.1:6379"))
    assert redisconn.is_cluster(cluster) and isinstance(cluster, RedisCluster)
    assert type(sentinel.connection_pool).__name__ == "_SentinelPool"
    assert not redisconn.is_cluster(sentinel) and not redisconn.is_cluster(plain)


# ---------------------------------------------------------------- slots


def test_key_slot_is_redis_cluster_hash_slot() -> None:
    for key in ["a", "relay:t:req:{x}:seq", "{}x", "a{}b{c}", "{c}", "x{y", str(uuid.uuid4())]:
        assert key_slot(key) == redis_key_slot(key.encode()), key


def test_every_slot_has_a_tag() -> None:
    assert all(key_slot("{" + slot_tag(s) + "}") == s for s in range(SLOTS))


def test_a_requests_keys_channels_and_firehose_shard_share_its_slot() -> None:
    keys = Keys("acme")
    for _ in range(200):
        rid = str(uuid.uuid4())
        rk = keys.request(rid)
        names = [getattr(rk, f) for f in rk.__dataclass_fields__]
        names += [keys.request_channel(rid), keys.firehose_shard(rid), keys.cancel(rid)]
        assert {key_slot(n) for n in names} == {key_slot(rid)}
        assert keys.is_firehose_shard(keys.firehose_shard(rid))
        assert firehose_tenant(keys.firehose_channel) == "acme"
        assert firehose_tenant(keys.request_channel(rid)) is None
    shards = keys.firehose_shards()
    assert len(set(shards)) == SLOTS and [key_slot(c) for c in shards] == list(range(SLOTS))
    probe = probe_channel("acme", "g1")
    assert key_slot(probe_shard(probe, 77)) == 77


class KeyRecorder:
    """Records the KEYS of every script call (and passes it on)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        call, queue, submit_in = LuaScript.__call__, LuaScript.queue, LuaScript.submit_in

        async def recorded_call(s: LuaScript, redis: Any, keys: list[str], args: list[Any]) -> Any:
            self.calls.append((s.name, keys))
            return await call(s, redis, keys, args)

        def recorded_queue(s: LuaScript, pipe: Any, keys: list[str], args: list[Any]) -> None:
            self.calls.append((s.name, keys))
            queue(s, pipe, keys, args)

        def recorded_submit(
            s: LuaScript, calls: Any, keys: list[str], args: list[Any]
        ) -> asyncio.Future[Any]:
            self.calls.append((s.name, keys))
            return submit_in(s, calls, keys, args)

        monkeypatch.setattr(LuaScript, "submit_in", recorded_submit)
        monkeypatch.setattr(LuaScript, "__call__", recorded_call)
        monkeypatch.setattr(LuaScript, "queue", recorded_queue)


async def test_every_script_call_is_single_slot(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = KeyRecorder(monkeypatch)
    keys = Keys()
    rid = str(uuid.uuid4())
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": rid, "text": "x"})
    budget = RequestBudget(fake_redis, keys, rid, total=100_000)
    await budget.add(10)
    task, _ = await open_pause(budget)
    await answer_budget(fake_redis, keys, rid, "continue")
    await task
    task, _ = await open_pause(budget, timeout=0.05)  # closed by budget_timeout
    await task
    await script("epoch_bump")(fake_redis, [keys.request(rid).epoch], ["a", "b"])
    request_calls = list(recorder.calls)
    # The lease: one orchestrator's renewal and the scan that declares it lost
    # share the tenant's lease slot; each request's claim is in its own slot.
    lease = LeaseConfig(renew_interval=60, ttl_seconds=120)
    async with RelayClient(fake_redis, owns_connection=False, lease=lease) as orch:
        assert orch.lease is not None
        lost = str(uuid.uuid4())
        await orch.lease.hold(lost)
        spawned: dict[str, object] = {"type": "agent_spawned", "agent_id": lost, "parent_id": None}
        spawned |= {"task_description": "t", "depth": 0, "index": 0, "total": 1}
        await orch.publish(lost, spawned)
        await orch.lease.renew()
        await fake_redis.zadd(keys.leases, {orch.lease.orchestrator_id: 1})  # it stopped
        reaper = Reaper(GlobalConfig(), fake_redis, Metrics())
        assert await reaper.reap_once() == 1
    called = {name for name, _ in recorder.calls}
    assert called == set(script_names()), "every shipped script was exercised"
    for name, used in request_calls:
        assert {key_slot(k) for k in used} == {key_slot(rid)}, (name, used)
    for name, used in recorder.calls[len(request_calls) :]:
        assert len({key_slot(k) for k in used}) == 1, (name, used)


# ---------------------------------------------------------------- the sharded publish


def test_the_cluster_publish_script_differs_in_its_publish_command_only() -> None:
    plain, sharded = script("publish"), script("publish", sharded=True)
    assert plain.source.replace(PUBLISH_LINE, SHARDED_PUBLISH_LINE) == sharded.source
    assert SHARDED_PUBLISH_LINE not in plain.source and plain.sha != sharded.sha
    assert "redis.call('PUBLISH'" not in sharded.source
    with pytest.raises(ValueError, match="no line"):
        LuaScript("budget_add", sharded=True)


async def test_a_cluster_client_publishes_to_the_firehose_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[Any]] = []
    redis = redisconn.client(RedisConfig(mode="cluster", url="redis://127.0.0.1:7000"))
    client = RelayClient(redis, owns_connection=False)

    async def run(rid: str, keys: list[str], args: list[Any]) -> Published:
        seen.append(args)
        return Published(first_seq=1, last_seq=1, epoch="e", ts=1)

    monkeypatch.setattr(client, "_run", run)
    rid = str(uuid.uuid4())
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": rid, "text": "x"})
    assert client._script.sharded
    assert seen[0][5:7] == [Keys().request_channel(rid), Keys().firehose_shard(rid)]
    await redis.aclose()


def test_a_gateway_on_a_cluster_subscribes_through_the_cluster_link(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    from relay.config import GlobalConfig
    from relay.gateway.hub import Hub

    async def build() -> tuple[type, type]:
        config = GlobalConfig()
        cluster = redisconn.pubsub_client(RedisConfig(mode="cluster", url="redis://127.0.0.1:1"))
        on_cluster = Hub(config, fake_redis, cluster, Metrics(), control=fake_redis)
        plain = Hub(config, fake_redis, fake_redis, Metrics(), control=fake_redis)
        await cluster.aclose()
        return type(on_cluster.link), type(plain.link)

    assert asyncio.run(build()) == (ClusterLink, PubSubLink)
