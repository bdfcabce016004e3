"""Compact catch-up: the snapshot carries each agent's text so far, bounded, as of its seq."""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeAlias

import pytest

from relay.config import TEXT_KEEP_BYTES, ConfigError, GlobalConfig, load_config
from relay.gateway.store import RequestStore, agent_texts
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys

FakeRedis: TypeAlias = Any

RID = str(uuid.uuid4())
ROOT = str(uuid.uuid4())
CHILD = str(uuid.uuid4())


def spawned(agent: str, parent: str | None) -> dict[str, Any]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
            "task_description": "t", "depth": 0 if parent is None else 1, "index": 0,
            "total": 1}  # fmt: skip


def delta(agent: str, text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": agent, "text": text}


async def stream(client: RelayClient, deltas: list[tuple[str, str]], batch: int = 1) -> None:
    """Publish ``deltas`` (agent, text) in order, ``batch`` events per script call."""
    for i in range(0, len(deltas), batch):
        chunk = [delta(a, t) for a, t in deltas[i : i + batch]]
        if batch == 1:
            await client.publish(RID, chunk[0])
        else:
            await client.publish_many(RID, chunk)


async def test_text_so_far_is_every_delta_of_each_agent_in_order(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    await client.publish(RID, spawned(CHILD, ROOT))
    deltas = [(ROOT if i % 3 else CHILD, f"w{i} ") for i in range(900)]
    await stream(client, deltas[:450])
    await stream(client, deltas[450:], batch=50)
    snap = await RequestStore(fake_redis, Keys()).snapshot(RID)
    want = {a: "".join(t for b, t in deltas if b == a) for a in (ROOT, CHILD)}
    assert snap["texts"] == {
        a: {"text": want[a], "truncated": False, "bytes": len(want[a])} for a in (ROOT, CHILD)
    }
    assert snap["text_seq"] == snap["seq"] == 902
    # The agents themselves are as before: no text inside them.
    assert [a["agent_id"] for a in snap["agents"]] == [ROOT, CHILD]
    assert all("text" not in a for a in snap["agents"])


async def test_an_agent_seen_only_through_deltas_still_has_its_text(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, delta(ROOT, "hello"))
    snap = await RequestStore(fake_redis, Keys()).snapshot(RID)
    assert snap["agents"] == []
    assert snap["texts"][ROOT]["text"] == "hello"


async def test_the_snapshot_keeps_the_latest_bytes_and_says_it_cut(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await stream(client, [(ROOT, f"{i:04d}|") for i in range(200)], batch=20)
    full = "".join(f"{i:04d}|" for i in range(200))
    snap = await RequestStore(fake_redis, Keys(), text_max_bytes=100).snapshot(RID)
    text = snap["texts"][ROOT]
    assert text == {"text": full[-100:], "truncated": True, "bytes": len(full)}
    # A text within the bound is whole and not flagged.
    short = await RequestStore(fake_redis, Keys(), text_max_bytes=len(full)).snapshot(RID)
    assert short["texts"][ROOT] == {"text": full, "truncated": False, "bytes": len(full)}


async def test_a_cut_never_splits_a_character(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await stream(client, [(ROOT, "é€😀")] * 5)  # 2 + 3 + 4 bytes each
    for limit in range(1, 30):
        text = (await RequestStore(fake_redis, Keys(), text_max_bytes=limit).snapshot(RID))[
            "texts"
        ][ROOT]
        assert "\ufffd" not in text["text"]
        assert len(text["text"].encode()) <= limit
        assert ("é€😀" * 5).endswith(text["text"])
        assert text["truncated"] is True and text["bytes"] == 45


async def test_redis_keeps_only_the_latest_text_per_agent(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    piece = "abcdefghij" * 100  # 1,000 bytes
    deltas = [(ROOT, f"{i:05d}" + piece) for i in range(400)]  # ~402 KB
    await stream(client, deltas, batch=40)
    full = "".join(t for _, t in deltas)
    key = Keys().request(RID).text(ROOT)
    # Cut back to TEXT_KEEP once past twice that: never more than 2 x 64 KiB.
    assert TEXT_KEEP_BYTES <= await fake_redis.strlen(key) <= 2 * TEXT_KEEP_BYTES
    store = RequestStore(fake_redis, Keys(), text_max_bytes=TEXT_KEEP_BYTES)
    text = (await store.snapshot(RID))["texts"][ROOT]
    assert text == {"text": full[-TEXT_KEEP_BYTES:], "truncated": True, "bytes": len(full)}
    # One call whose deltas alone outgrow the bound, for a new text: cut at once.
    big = [(CHILD, f"{i:05d}" + piece) for i in range(150)]
    await stream(client, big, batch=150)
    assert await fake_redis.strlen(Keys().request(RID).text(CHILD)) == TEXT_KEEP_BYTES
    whole = "".join(t for _, t in big)
    text = (await store.snapshot(RID))["texts"][CHILD]
    assert text == {"text": whole[-TEXT_KEEP_BYTES:], "truncated": True, "bytes": len(whole)}


async def test_text_keys_share_the_hash_tag_and_ttl_of_the_history(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, delta(ROOT, "x"))
    rk = Keys("acme").request(RID)
    assert rk.text(ROOT).startswith(rk.state.removesuffix("state"))
    assert "{" + RID + "}" in rk.text(ROOT)
    key = Keys().request(RID).text(ROOT)
    ttl = GlobalConfig().history.ttl_seconds
    assert ttl - 5 <= await fake_redis.ttl(key) <= ttl
    # Refreshed at every 4 KiB of text (not every delta: an EXPIRE per call
    # would cost a tenth of a one-delta publish).
    await fake_redis.expire(key, 10)
    await client.publish(RID, delta(ROOT, "y" * 100))
    assert 0 < await fake_redis.ttl(key) <= 10
    await client.publish(RID, delta(ROOT, "y" * 4000))  # crosses 4096
    assert ttl - 5 <= await fake_redis.ttl(key) <= ttl
    # The cut rewrites the key: it keeps a TTL all the same.
    await client.publish_many(RID, [delta(ROOT, "z" * 1000)] * 140)
    assert await fake_redis.strlen(key) == TEXT_KEEP_BYTES
    assert ttl - 5 <= await fake_redis.ttl(key) <= ttl


async def test_a_new_incarnation_starts_without_the_old_texts(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await stream(client, [(ROOT, "old "), (CHILD, "gone ")])
    old_epoch = await fake_redis.get(Keys().request(RID).epoch)
    # Redis lost the seq counter (eviction, a partial restore): a new epoch.
    await fake_redis.delete(Keys().request(RID).seq)
    await client.publish(RID, delta(ROOT, "new"))
    snap = await RequestStore(fake_redis, Keys()).snapshot(RID)
    assert snap["epoch"] != old_epoch.decode() and snap["seq"] == 1
    assert snap["texts"] == {ROOT: {"text": "new", "truncated": False, "bytes": 3}}
    assert not await fake_redis.exists(Keys().request(RID).text(CHILD))


async def test_no_text_when_disabled_and_none_for_empty_deltas(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await stream(client, [(ROOT, ""), (CHILD, "x")])
    assert (await RequestStore(fake_redis, Keys(), text_max_bytes=0).snapshot(RID))["texts"] == {}
    assert list((await RequestStore(fake_redis, Keys()).snapshot(RID))["texts"]) == [CHILD]


async def test_snapshot_then_later_deltas_is_the_whole_text_once(fake_redis: FakeRedis) -> None:
    """What a late joiner does: render the snapshot, then apply events with seq > text_seq."""
    client = RelayClient(fake_redis, owns_connection=False)
    store = RequestStore(fake_redis, Keys())
    await stream(client, [(ROOT, f"a{i} ") for i in range(300)], batch=30)
    snap = await store.snapshot(RID)
    await stream(client, [(ROOT, f"b{i} ") for i in range(100)], batch=7)
    history = await fake_redis.xrange(Keys().request(RID).history)
    later = [json.loads(f[b"f"]) for _, f in history]
    rendered = snap["texts"][ROOT]["text"] + "".join(
        e["text"] for e in later if e["seq"] > snap["text_seq"]
    )
    assert rendered == "".join(f"a{i} " for i in range(300)) + "".join(f"b{i} " for i in range(100))


async def test_the_snapshot_keeps_every_field_older_clients_read(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    await client.publish(RID, delta(ROOT, "x"))
    snap = await RequestStore(fake_redis, Keys()).snapshot(RID)
    assert list(snap) == ["type", "request_id", "epoch", "seq", "agents", "budget",
                          "pending_decision", "last_decision", "synthesis_started", "outcome",
                          "texts", "text_seq"]  # fmt: skip
    assert snap["agents"][0]["status"] == "running" and snap["seq"] == 2


def test_agent_texts_drops_only_continuation_bytes_of_a_cut_tail() -> None:
    assert agent_texts([b"a", 5, "€x".encode()[1:]]) == {
        "a": {"text": "x", "truncated": True, "bytes": 5}
    }
    # A whole text is never trimmed, whatever it starts with.
    assert agent_texts([b"a", 3, b"abc"])["a"] == {"text": "abc", "truncated": False, "bytes": 3}


def test_text_max_bytes_is_validated_and_named() -> None:
    assert GlobalConfig().snapshot.text_max_bytes == 16 * 1024
    with pytest.raises(ConfigError, match=r"snapshot\.text_max_bytes"):
        load_config(environ={"RELAY_SNAPSHOT_TEXT_MAX_BYTES": str(TEXT_KEEP_BYTES + 1)})
    with pytest.raises(ConfigError, match=r"snapshot\.text_max_bytes"):
        load_config(environ={"RELAY_SNAPSHOT_TEXT_MAX_BYTES": "-1"})


async def test_an_agent_that_starts_its_text_during_the_read_is_not_lost(
    fake_redis: FakeRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, delta(ROOT, "first "))
    store = RequestStore(fake_redis, Keys())
    real_hkeys = fake_redis.hkeys

    async def hkeys_then_publish(name: str) -> Any:
        # The agents with text are learned, then another one starts its text
        # before the state and the texts are read.
        fields = await real_hkeys(name)
        await client.publish(RID, delta(CHILD, "late"))
        return fields

    fake_redis.hkeys = hkeys_then_publish
    snap = await store.snapshot(RID)
    assert snap["seq"] == 2
    assert {a: t["text"] for a, t in snap["texts"].items()} == {ROOT: "first ", CHILD: "late"}
