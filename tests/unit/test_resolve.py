"""Short ids (the 8 characters tail and console show) resolved against Redis."""

from __future__ import annotations

import uuid

import fakeredis
import pytest

from relay.orchestrator.client import RelayClient
from relay.tools import resolve
from relay.tools.resolve import Kind, PrefixSyntaxError, ResolveError, resolve_id
from relay.wire.keys import Keys

KEYS = Keys("default")


def uid(head: str) -> str:
    return str(uuid.UUID(head + uuid.uuid4().hex[len(head) :]))


async def spawn(redis: fakeredis.FakeAsyncRedis, rid: str, agent: str, parent: str | None) -> None:
    client = RelayClient(redis, owns_connection=False)
    await client.publish(rid, {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
                               "task_description": "t", "depth": 0 if parent is None else 1,
                               "index": 0, "total": 1})  # fmt: skip


async def test_prefixes_resolve_to_agents_and_requests(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid, root, child = uid("aaaa0000"), uid("bbbb0000"), uid("bbbb1111")
    await spawn(fake_redis, rid, root, None)
    await spawn(fake_redis, rid, child, root)

    match = await resolve_id(fake_redis, KEYS, "bbbb0000")
    assert match is not None and (match.id, match.kind, match.request_id) == (root, "agent", rid)
    match = await resolve_id(fake_redis, KEYS, rid[:8].upper())
    assert match is not None and (match.id, match.kind) == (rid, "request")
    match = await resolve_id(fake_redis, KEYS, child.replace("-", "")[:12])
    assert match is not None and match.id == child, "hyphens may be left out"

    with pytest.raises(ResolveError, match=r"bbbb is ambiguous \(2 matches: agent "):
        await resolve_id(fake_redis, KEYS, "bbbb")
    with pytest.raises(ResolveError, match="no id starts with cccc"):
        await resolve_id(fake_redis, KEYS, "cccc")
    with pytest.raises(ResolveError, match="no id starts with bbbb0000"):
        only_requests: tuple[Kind, ...] = ("request",)
        await resolve_id(fake_redis, KEYS, "bbbb0000", kinds=only_requests)
    for bad in ("bbb", "zzzz", "bbbb 0000", ""):
        with pytest.raises(PrefixSyntaxError):
            await resolve_id(fake_redis, KEYS, bad)


async def test_a_full_uuid_is_used_as_is_without_a_lookup(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    unknown = str(uuid.uuid4())
    assert await resolve_id(fake_redis, KEYS, unknown.upper()) is None


async def test_request_narrows_the_search_and_must_exist(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    first, second = uid("1111"), uid("2222")
    a, b = uid("abcdef01"), uid("abcdef02")
    await spawn(fake_redis, first, a, None)
    await spawn(fake_redis, second, b, None)
    with pytest.raises(ResolveError, match="ambiguous"):
        await resolve_id(fake_redis, KEYS, "abcdef0")
    match = await resolve_id(fake_redis, KEYS, "abcdef0", request_id=second)
    assert match is not None and match.id == b
    with pytest.raises(ResolveError, match="has no state in Redis"):
        await resolve_id(fake_redis, KEYS, "abcdef0", request_id=str(uuid.uuid4()))


async def test_only_the_most_recent_requests_are_searched(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolve, "RECENT_REQUESTS", 2)
    old, newer, newest = uid("01d0"), uid("1e1e"), uid("2e2e")
    for rid in (old, newer, newest):
        await spawn(fake_redis, rid, str(uuid.uuid4()), None)
    # Scores are milliseconds: make the order explicit instead of racing the clock.
    await fake_redis.zadd(KEYS.active, {old: 1, newer: 2, newest: 3})
    with pytest.raises(ResolveError, match="searched the 2 most recently active requests"):
        await resolve_id(fake_redis, KEYS, old[:8])
    match = await resolve_id(fake_redis, KEYS, newer[:8])
    assert match is not None and match.id == newer
    match = await resolve_id(fake_redis, KEYS, old[:8], request_id=old)
    assert match is not None and match.id == old, "an explicit --request is always searched"


async def test_many_matches_are_listed_briefly(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = uid("9999")
    agents = [uid("cafe") for _ in range(8)]
    for agent in agents:
        await spawn(fake_redis, rid, agent, None)
    with pytest.raises(ResolveError) as err:
        await resolve_id(fake_redis, KEYS, "cafe", request_id=rid)
    assert "cafe is ambiguous (8 matches: " in str(err.value)
    assert "; and 3 more)" in str(err.value)
