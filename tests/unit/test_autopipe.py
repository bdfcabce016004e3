"""AutoPipeline: concurrent calls share round trips, each keeps its own reply."""

from __future__ import annotations

import asyncio
import uuid

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from relay.orchestrator import client as client_module
from relay.orchestrator.autopipe import AutoPipeline, pack_commands
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys


async def test_calls_made_in_one_pass_of_the_loop_share_one_pipeline(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    calls = AutoPipeline(fake_redis)
    replies = await asyncio.gather(*(calls.call("INCR", "n") for _ in range(20)))
    assert sorted(replies) == list(range(1, 21))
    assert (calls.pipelines, calls.calls) == (1, 20)
    await calls.aclose()


async def test_each_call_gets_its_own_reply_or_its_own_error(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    await fake_redis.set("text", "not a number")
    calls = AutoPipeline(fake_redis)
    results = await asyncio.gather(
        calls.call("SET", "a", "1"),
        calls.call("INCR", "text"),
        calls.call("GET", "a"),
        return_exceptions=True,
    )
    assert results[0] is True or results[0] == b"OK"
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"1"
    assert calls.pipelines == 1
    await calls.aclose()


async def test_a_pipeline_holds_at_most_max_calls(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    calls = AutoPipeline(fake_redis, max_calls=3, max_in_flight=1)
    await asyncio.gather(*(calls.call("INCR", "n") for _ in range(7)))
    assert (calls.pipelines, calls.calls) == (3, 7)
    assert await fake_redis.get("n") == b"7"
    await calls.aclose()


async def test_a_call_cancelled_before_its_pipeline_leaves_is_not_sent(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    calls = AutoPipeline(fake_redis)
    dropped = calls.submit("INCR", "dropped")
    kept = calls.submit("INCR", "kept")
    dropped.cancel()
    assert await kept == 1
    assert calls.calls == 1
    assert await fake_redis.get("dropped") is None
    await calls.aclose()


async def test_a_connection_failure_fails_every_call_of_the_pipeline() -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    calls = AutoPipeline(redis)
    server.connected = False
    results = await asyncio.gather(
        calls.call("INCR", "a"), calls.call("INCR", "b"), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    server.connected = True
    assert await calls.call("INCR", "a") == 1  # the next pipeline goes through
    await calls.aclose()
    await redis.aclose()


async def test_aclose_cancels_what_is_queued(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    calls = AutoPipeline(fake_redis)
    queued = calls.submit("INCR", "n")
    await calls.aclose()
    assert queued.cancelled()


text = st.text(max_size=20)
argument = st.one_of(text, st.binary(max_size=20), st.integers(), st.floats(allow_nan=False))


name = st.sampled_from(["EVALSHA", "ZADD", "EXPIRE"])
command = st.tuples(name, st.lists(argument, max_size=6)).map(lambda c: (c[0], *c[1]))


@given(st.lists(command, min_size=1, max_size=4))
def test_packing_matches_redis_py(commands: list[tuple[str | bytes | int | float, ...]]) -> None:
    connection = Connection()
    assert pack_commands(commands) == b"".join(connection.pack_commands(commands))


def test_packing_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(DataError, match="NoneType"):
        pack_commands([("ZADD", "k", None)])


async def test_the_activity_index_is_refreshed_at_most_once_a_second(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    rid = str(uuid.uuid4())
    delta = {"type": "agent_text_delta", "agent_id": rid, "text": "x"}
    await client.publish(rid, delta)
    first = await fake_redis.zscore(Keys().active, rid)
    assert first is not None
    sent = client.calls.calls
    await client.publish(rid, delta)
    assert client.calls.calls == sent + 1, "only the publish script: no index refresh"
    monkeypatch.setattr(client_module, "ACTIVE_REFRESH_S", 0.0)
    await fake_redis.zadd(Keys().active, {rid: 1})
    await client.publish(rid, delta)
    refreshed = await fake_redis.zscore(Keys().active, rid)
    assert refreshed is not None and refreshed >= first
    await client.aclose()
