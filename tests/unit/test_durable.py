"""Durable Streams read API pieces: offsets, cursors, stream state, live tails (fakeredis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest

from relay.config import GatewayConfig, GlobalConfig, HistoryConfig
from relay.gateway.dsoffset import (
    CURSOR_EPOCH_S,
    BadOffset,
    Offset,
    parse_offset,
    response_cursor,
)
from relay.gateway.dsread import LiveTail, ReplayBudgets, read_chunk, stream_state
from relay.gateway.dssse import data_event
from relay.gateway.envelope import Envelope
from relay.gateway.hub import Hub
from relay.gateway.metrics import Metrics
from relay.gateway.store import HistoryGap, RequestStore
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys


def test_offsets_round_trip_and_sort_in_stream_order() -> None:
    offsets = [str(Offset("ep_1.a-b", seq)) for seq in (0, 1, 9, 10, 15, 16, 255, 4096, 2**62)]
    assert offsets == sorted(offsets)
    for text, seq in zip(offsets, (0, 1, 9, 10, 15, 16, 255, 4096, 2**62), strict=True):
        assert parse_offset(text) == Offset("ep_1.a-b", seq)
        assert text not in ("-1", "now")
        assert not set(text) & set(",&=?/")


@pytest.mark.parametrize("raw", [None, "-1"])
def test_missing_offset_and_minus_one_are_the_start(raw: str | None) -> None:
    assert parse_offset(raw) == "-1"


def test_now_is_the_tail() -> None:
    assert parse_offset("now") == "now"


@pytest.mark.parametrize(
    "raw",
    ["", "0", "-2", "NOW", "abc", "ep_12", "ep_000000000000000G", "ep_0000000000000000a", "_" * 17,
     "e/p_0000000000000001", "x" * 65 + "_0000000000000001", "ep_000000000000000A"],
)  # fmt: skip
def test_malformed_offsets_are_refused(raw: str) -> None:
    with pytest.raises(BadOffset, match="not an offset this server returned"):
        parse_offset(raw)


def test_cursor_is_the_interval_and_never_goes_back() -> None:
    now = CURSOR_EPOCH_S + 20 * 1000 + 5
    assert response_cursor(None, 20, now=now) == "1000"
    assert response_cursor("999", 20, now=now) == "1000"
    assert response_cursor("junk", 20, now=now) == "1000"
    for echoed in ("1000", "1500"):
        moved = [int(response_cursor(echoed, 20, now=now)) for _ in range(50)]
        assert all(int(echoed) < c <= int(echoed) + 180 for c in moved)


def test_sse_data_lines_never_break_the_framing() -> None:
    assert data_event('[{"a":1}]') == 'event: data\ndata: [{"a":1}]\n\n'
    framed = data_event('[{"a":\n1},\r\n{"b":2}\r]')
    assert framed == 'event: data\ndata: [{"a":\ndata: 1},\ndata: {"b":2}\ndata: ]\n\n'


def env(seq: int, epoch: str = "e1", rid: str = "r") -> Envelope:
    return Envelope(rid, seq, epoch, "agent_text_delta", f'{{"seq":{seq}}}', nbytes=10)


def test_live_tail_hands_over_contiguous_events_and_flags_holes() -> None:
    tail = LiveTail("r", maxlen=3)
    for seq in (4, 5, 6):
        tail.offer(env(seq))
    tail.offer(env(7, rid="other"))  # another request: never buffered
    events, contiguous = tail.take(after=3, epoch="e1")
    assert [e.seq for e in events] == [4, 5, 6] and contiguous
    assert not tail.wake.is_set()
    # Overflow drops the oldest (drop_oldest): the reader sees the hole.
    for seq in (7, 8, 9, 10):
        tail.offer(env(seq))
    events, contiguous = tail.take(after=6, epoch="e1")
    assert [e.seq for e in events] == [8, 9, 10] and not contiguous
    assert tail.high == ("e1", 10)
    # Repeated events and another epoch's events are not handed over.
    tail.offer(env(10))
    tail.offer(env(1, epoch="e2"))
    assert tail.take(after=10, epoch="e1") == ([], True)


def test_replay_budget_is_per_subject_and_bounded() -> None:
    budgets = ReplayBudgets(per_minute=100, max_subjects=2)
    assert budgets.retry_after("a") is None
    budgets.spend("a", [env(1)] * 11)
    wait = budgets.retry_after("a")
    assert wait is not None and wait > 0
    assert budgets.retry_after("b") is None
    budgets.retry_after("c")  # a third subject evicts the least recently used ("a")
    assert budgets.retry_after("a") is None


@pytest.fixture
async def redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


async def spawn_root(client: RelayClient, rid: str, root: str) -> int:
    return await client.publish(
        rid,
        {"type": "agent_spawned", "agent_id": root, "parent_id": None,
         "task_description": "t", "depth": 0, "index": 0, "total": 1},
    )  # fmt: skip


async def complete(client: RelayClient, rid: str, agent: str) -> int:
    return await client.publish(
        rid,
        {"type": "agent_completed", "agent_id": agent, "result_summary": "ok",
         "tokens_used": 1, "duration_ms": 1},
    )  # fmt: skip


async def test_stream_state_closes_at_the_outcome_seq(redis: fakeredis.FakeAsyncRedis) -> None:
    client = RelayClient(redis, owns_connection=False)
    keys = Keys()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await stream_state(redis, keys, rid)).epoch is None
    await spawn_root(client, rid, root)
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": root, "text": "a"})
    state = await stream_state(redis, keys, rid)
    assert state.tail == 2 and not state.closed and state.epoch
    final = await complete(client, rid, root)
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": root, "text": "late"})
    state = await stream_state(redis, keys, rid)
    assert state.closed and state.tail == final == 3


async def test_read_chunk_is_bounded_and_reports_trimmed_history(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    client = RelayClient(redis, owns_connection=False, history=HistoryConfig(max_events=8))
    store = RequestStore(redis, Keys())
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    await spawn_root(client, rid, root)
    for _ in range(5):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": root, "text": "x" * 50})
    epoch = (await stream_state(redis, Keys(), rid)).epoch or ""
    chunk = await read_chunk(store, rid, epoch, 0, 6, max_events=4, max_bytes=10**6)
    assert [e.seq for e in chunk.events] == [1, 2, 3, 4] and chunk.end == 4
    two = chunk.events[1].nbytes + chunk.events[2].nbytes
    by_bytes = await read_chunk(store, rid, epoch, 1, 6, max_events=10, max_bytes=two)
    assert [e.seq for e in by_bytes.events] == [2, 3] and by_bytes.end == 3
    huge = await read_chunk(store, rid, epoch, 1, 6, max_events=10, max_bytes=1)
    assert [e.seq for e in huge.events] == [2]  # one event always goes, however large
    for _ in range(5):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": root, "text": "y"})
    with pytest.raises(HistoryGap):
        await read_chunk(store, rid, epoch, 0, 11, max_events=4, max_bytes=10**6)


async def test_a_live_tail_is_fed_by_the_hub() -> None:
    server = fakeredis.FakeServer()
    commands = fakeredis.FakeAsyncRedis(server=server)
    pubsub = fakeredis.FakeAsyncRedis(server=server)
    config = GlobalConfig(gateway=GatewayConfig(probe_interval=0.1, probe_timeout=0.5))
    hub = Hub(config, commands, pubsub, Metrics())
    await hub.start()
    try:
        client = RelayClient(commands, owns_connection=False)
        rid, root = str(uuid.uuid4()), str(uuid.uuid4())
        await spawn_root(client, rid, root)
        tail = LiveTail(rid, maxlen=16)
        await hub.watch(rid, tail)
        seq = await client.publish(rid, {"type": "agent_text_delta", "agent_id": root, "text": "a"})
        async with asyncio.timeout(5):
            await tail.wake.wait()
        events, contiguous = tail.take(after=seq - 1, epoch=tail.buffer[0].epoch)
        assert [e.seq for e in events] == [seq] and contiguous
        await hub.unwatch(rid, tail)
    finally:
        await hub.close()
        await commands.aclose()
        await pubsub.aclose()
