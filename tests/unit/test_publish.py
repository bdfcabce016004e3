"""The publish path: one atomic script assigns seq, keeps history and state, publishes."""

from __future__ import annotations

import asyncio
import json
import uuid

import fakeredis
import pytest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.client import PublishError, RelayClient
from relay.config import HistoryConfig
from relay.gateway.envelope import Envelope
from relay.keys import Keys, validate_tenant

RID = str(uuid.uuid4())
ROOT = str(uuid.uuid4())
CHILD = str(uuid.uuid4())


def spawned(agent: str, parent: str | None, depth: int = 0) -> dict[str, object]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
            "task_description": "t", "depth": depth, "index": 0, "total": 1}  # fmt: skip


def test_every_key_of_a_request_shares_one_hash_tag() -> None:
    rk = Keys("acme").request(RID)
    tags = {k[k.index("{") : k.index("}") + 1] for k in (*rk.script_keys, rk.pending, rk.decision,
                                                           rk.budget)}  # fmt: skip
    assert tags == {"{" + RID + "}"}
    assert Keys("acme").cancel(RID).endswith("{" + RID + "}")
    assert Keys("acme").request_id_from_channel(rk.channel) == RID
    assert "acme" in rk.seq and "acme" in Keys("acme").firehose_channel


def test_tenant_names_are_validated() -> None:
    with pytest.raises(ValueError, match="invalid tenant"):
        validate_tenant("a:b")


async def test_seq_is_assigned_atomically_and_never_reused(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    seqs = await asyncio.gather(
        *(client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": str(i)})
          for i in range(50))
    )  # fmt: skip
    assert sorted(seqs) == list(range(1, 51))
    history = await fake_redis.xrange(client.keys.request(RID).history)
    assert [int(eid.split(b"-")[0]) for eid, _ in history] == list(range(1, 51))


async def test_frame_is_the_event_plus_request_id_seq_ts(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(client.keys.request_channel(RID))
    await client.publish(RID, spawned(ROOT, None))
    message = None
    while message is None or message["type"] != "message":
        message = await pubsub.get_message(timeout=1)
    env = Envelope.parse(message["data"])
    frame = json.loads(env.frame)
    assert frame["type"] == "agent_spawned" and frame["parent_id"] is None
    assert frame["request_id"] == RID and frame["seq"] == 1 and isinstance(frame["ts"], int)
    assert (env.request_id, env.seq, env.type) == (RID, 1, "agent_spawned")
    await pubsub.aclose()


async def test_batch_is_one_contiguous_seq_range(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    published = await client.publish_text_deltas(RID, ROOT, ["a", "b", "c"])
    assert (published.first_seq, published.last_seq) == (2, 4)


async def test_history_is_capped_by_count(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(fake_redis, history=HistoryConfig(max_events=5), owns_connection=False)
    for i in range(12):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": str(i)})
    rk = client.keys.request(RID)
    history = await fake_redis.xrange(rk.history)
    assert [int(e.split(b"-")[0]) for e, _ in history] == [8, 9, 10, 11, 12]
    assert 0 < await fake_redis.ttl(rk.history) <= HistoryConfig().ttl_seconds


async def test_state_tracks_agents_budget_and_outcome(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    await client.publish(RID, spawned(CHILD, ROOT, 1))
    await client.publish(RID, {"type": "budget_update", "request_id": RID, "tokens_used": 10,
                               "budget_total": 100, "percentage": 10.0})  # fmt: skip
    await client.publish(RID, {"type": "agent_cancelled", "agent_id": CHILD, "reason": "r"})
    done = {"type": "agent_completed", "agent_id": ROOT, "result_summary": "ok",
            "tokens_used": 9, "duration_ms": 5}  # fmt: skip
    await client.publish(RID, done)
    state = await fake_redis.hgetall(client.keys.request(RID).state)
    child = json.loads(state[f"a:{CHILD}".encode()])
    assert child["status"] == "cancelled" and child["parent_id"] == ROOT
    assert json.loads(state[b"budget"])["tokens_used"] == 10
    outcome = json.loads(state[b"outcome"])
    assert outcome["status"] == "completed" and outcome["agent_id"] == ROOT


async def test_invalid_events_never_reach_redis(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    with pytest.raises(ValidationError, match="agent_id"):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": "x", "text": "t"})
    with pytest.raises(ValueError, match="request_id"):
        await client.publish("not-a-uuid", {"type": "synthesis_started", "request_id": RID})
    other = str(uuid.uuid4())
    with pytest.raises(ValueError, match="request_id"):
        await client.publish(RID, {"type": "synthesis_started", "request_id": other})
    assert await fake_redis.keys("*") == []


async def test_retry_after_an_ambiguous_failure_does_not_duplicate(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    real = client._run
    calls = 0

    async def lose_first_reply(rid: str, keys: list[str], args: list[object]):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        result = await real(rid, keys, args)
        if calls == 1:
            raise RedisConnectionError("reply lost")
        return result

    monkeypatch.setattr(client, "_run", lose_first_reply)
    seq = await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": "x"})
    assert seq == 1 and calls == 2
    assert await fake_redis.xlen(client.keys.request(RID).history) == 1


async def test_publish_error_after_the_retry_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    dead.connection_pool.connection_kwargs["server"].connected = False
    client = RelayClient(dead, publish_retry_seconds=0.3, owns_connection=False)
    with pytest.raises(PublishError, match="failed after"):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": "x"})
    await dead.aclose()


async def test_an_event_with_its_own_request_id_has_it_once(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, {"type": "synthesis_started", "request_id": RID})
    [(_, fields)] = await fake_redis.xrange(client.keys.request(RID).history)
    frame = fields[b"f"].decode()
    assert frame.count('"request_id"') == 1
    assert json.loads(frame) == {"type": "synthesis_started", "request_id": RID, "seq": 1,
                                 "ts": json.loads(frame)["ts"]}  # fmt: skip


async def test_a_lost_seq_starts_a_new_incarnation(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    """Evicted or lost seq with history kept: a new epoch at seq 1, never a stuck request."""
    client = RelayClient(fake_redis, owns_connection=False)
    first = await client.publish_many(RID, [{"type": "synthesis_started", "request_id": RID}] * 3)
    rk = client.keys.request(RID)
    await fake_redis.delete(rk.seq)
    again = await client.publish_many(RID, [{"type": "synthesis_started", "request_id": RID}])
    assert again.last_seq == 1 and again.epoch != first.epoch
    assert await fake_redis.xlen(rk.history) == 1


async def test_script_refusals_are_publish_errors(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await fake_redis.set(client.keys.request(RID).history, "not a stream")
    await fake_redis.set(client.keys.request(RID).seq, 1)
    await fake_redis.set(client.keys.request(RID).epoch, "e")
    with pytest.raises(PublishError, match="refused by Redis"):
        await client.publish(RID, {"type": "synthesis_started", "request_id": RID})
