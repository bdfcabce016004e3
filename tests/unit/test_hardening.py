"""No frame kills a connection, every buffer is bounded, nothing falls back silently.

Each test here proves one mechanism of the connection: it fails when that
mechanism is removed (checked once by removing it).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from itertools import pairwise
from typing import Any

import fakeredis
import pytest
from starlette.websockets import WebSocketState

from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import TURN_FRAMES, SendQueue
from relay.orchestrator.client import RelayClient
from relay.wire.commands import CommandError, load_object, parse_command
from tests.unit.test_connection import AGENT, running

DEEP = "[" * 985 + "]" * 985


@pytest.mark.parametrize(
    "frame",
    [
        DEEP,
        '{"type":"ping","command_id":"x","extra":' + DEEP + "}",
        '{"type":"cancel_agent","agent_id":' + "{" * 600 + "}" * 600 + "}",
        '{"type":"ping","command_id":"\\ud800"}',
        '{"type":"ping","command_id":"ok","note":"\\udfff"}',
    ],
    ids=["deep-array", "deep-field", "deep-object", "lone-surrogate-id", "lone-surrogate-field"],
)
async def test_hostile_frames_are_answered_and_the_connection_kept(
    fake_redis: fakeredis.FakeAsyncRedis, frame: str
) -> None:
    async with running(fake_redis) as h:
        h.ws.incoming.put_nowait({"type": "websocket.receive", "text": frame})
        h.ws.client_sends({"type": "ping", "command_id": "after"})
        await h.until(lambda: bool(h.ws.of_type("pong")))
        errors = h.ws.of_type("error")
        assert [e["code"] for e in errors] == ["invalid_json"]
        assert h.ws.of_type("pong")[0]["command_id"] == "after"
        assert h.ws.application_state == WebSocketState.CONNECTED


def test_parse_limits_are_precise() -> None:
    # Legitimate frames pass: a paired surrogate escape is a real character,
    # brackets inside strings are not nesting.
    assert parse_command('{"type":"ping","command_id":"\\ud83d\\ude00"}').command_id == "\U0001f600"
    assert parse_command('{"type":"ping","command_id":"' + "[" * 500 + '"}').type == "ping"
    assert isinstance(load_object('{"a":' + "[" * 31 + "]" * 31 + "}")["a"], list)
    with pytest.raises(CommandError, match="deeper than 32"):
        load_object('{"a":' + "[" * 32 + "]" * 32 + "}")


async def test_an_unexpected_exception_in_a_command_is_answered(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(fake_redis) as h:

        async def broken(command: Any) -> dict[str, Any]:
            raise KeyError("a defect")

        monkeypatch.setattr(h.conn, "_execute", broken)
        h.ws.client_sends({"type": "ping", "command_id": 1})
        h.ws.client_sends({"type": "ping", "command_id": 2})
        await h.until(lambda: len(h.ws.of_type("error")) == 2)
        assert {e["code"] for e in h.ws.of_type("error")} == {"internal_error"}
        assert h.ws.application_state == WebSocketState.CONNECTED


async def test_a_failing_writer_closes_with_1011_not_a_silent_drop(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(fake_redis) as h:
        real = h.ws.send_text

        async def send_text(text: str) -> None:
            if "boom" in text:
                raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")
            await real(text)

        monkeypatch.setattr(h.ws, "send_text", send_text)
        h.conn._reply({"type": "pong", "command_id": "boom"})
        await h.until(lambda: h.ws.close_code is not None)
        assert h.ws.close_code == 1011


async def test_a_second_subscribe_holds_a_bounded_buffer(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store answers a re-subscribe, live events wait in a buffer of
    at most send_queue_max; what it drops comes back from history, in order."""
    rid = str(uuid.uuid4())
    async with running(fake_redis, send_queue_max=8) as h:
        h.ws.client_sends({"type": "subscribe", "request_id": rid})
        await h.until(lambda: bool(h.ws.of_type("subscribed")))
        envs = await h.publish(rid, 200)
        gate = asyncio.Event()
        real_position = h.hub.store.position

        async def slow_position(request_id: str) -> Any:
            await gate.wait()
            return await real_position(request_id)

        monkeypatch.setattr(h.hub.store, "position", slow_position)
        h.ws.client_sends({"type": "subscribe", "request_id": rid, "after_seq": 0})
        await h.until(lambda: h.conn._subs[rid].hold)
        for env in envs:
            h.conn.offer(env)
        held = h.conn._subs[rid].pending
        assert held is not None and len(held) == 8
        gate.set()
        await h.until(lambda: len(h.ws.events(rid)) >= 200)
        # The resume replays 1..200 from after_seq=0; nothing lost, nothing twice.
        assert h.ws.events(rid) == list(range(1, 201))


async def test_lag_records_are_bounded() -> None:
    """A tenant-wide client whose dropped events span more requests than the
    bound is closed with 1013 instead of keeping a record per request forever."""
    queue = SendQueue(2, 1 << 20, "drop_oldest", Metrics(), max_lagged=5)
    for i in range(10):
        rid = str(uuid.UUID(int=i))
        queue.push_event(Envelope(rid, 1, "e", "agent_text_delta", "{}", nbytes=2))
    assert len(queue.lags) <= 5
    assert queue.close_code == 1013


async def test_a_connect_time_subscription_that_cannot_start_closes_1013(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never the tenant-wide stream instead of the request asked for."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    rid = str(uuid.uuid4())
    calls = 0

    async def down(request_id: str) -> None:
        nonlocal calls
        calls += 1
        raise RedisConnectionError("Error 111 connecting to 10.1.2.3:6379")

    monkeypatch.setattr("relay.gateway.store.RequestStore.position", lambda self, r: down(r))
    async with running(
        fake_redis, query=f"request_id={rid}&after_seq=3", connect_subscribe_timeout=0.3
    ) as h:
        await h.until(lambda: h.ws.close_code is not None)
        assert h.ws.close_code == 1013
        assert calls >= 2  # retried before giving up
        assert h.conn not in h.hub.firehose
        # Redis's address is the gateway's business, not the client's.
        assert "10.1.2.3" not in json.dumps(h.ws.sent)


async def test_a_connect_time_subscription_survives_a_brief_outage(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from relay.gateway.store import RequestStore

    rid = str(uuid.uuid4())
    real = RequestStore.position
    failures = 2

    async def flaky(self: RequestStore, request_id: str) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise RedisConnectionError("Connection closed by server.")
        return await real(self, request_id)

    publisher = RelayClient(fake_redis, owns_connection=False)
    for i in range(5):
        await publisher.publish(
            rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)}
        )
    monkeypatch.setattr(RequestStore, "position", flaky)
    async with running(fake_redis, query=f"request_id={rid}&after_seq=2") as h:
        await h.until(lambda: h.ws.events(rid) == [3, 4, 5])
        assert failures == 0
        assert not h.ws.of_type("error")
        assert h.conn not in h.hub.firehose


async def test_stream_none_carries_nothing_until_subscribed(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, query="stream=none") as h:
        h.ws.client_sends({"type": "ping"})
        await h.until(lambda: bool(h.ws.of_type("pong")))
        assert h.conn not in h.hub.firehose
        h.ws.client_sends({"type": "subscribe", "request_id": rid})
        await h.until(lambda: bool(h.ws.of_type("subscribed")))
        h.ws.client_sends({"type": "unsubscribe", "request_id": rid})
        await h.until(lambda: bool(h.ws.of_type("unsubscribed")))
        assert h.conn not in h.hub.firehose


async def test_unparseable_history_entries_are_skipped_not_fatal(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    """An entry written by a publisher that bypassed the script's checks
    does not disconnect every client that resumes across it."""
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        await h.publish(rid, 2)
        history = h.client.keys.request(rid).history
        await fake_redis.xadd(history, {"f": "not json at all"}, id="3-0")
        await fake_redis.set(h.client.keys.request(rid).seq, 3)
        await h.publish(rid, 2)  # seqs 4 and 5
        skipped: list[int] = []
        h.hub.store.on_skip = lambda r, seq, why: skipped.append(seq)
        h.ws.client_sends({"type": "subscribe", "request_id": rid, "after_seq": 0})
        await h.until(lambda: h.ws.events(rid) == [1, 2, 4, 5])
        assert skipped == [3]
        assert h.ws.application_state == WebSocketState.CONNECTED


def test_envelope_counts_bytes_not_characters() -> None:
    frame = '{"type":"agent_text_delta","text":"héllo wörld ✓"}'
    header = f"e 1 {AGENT} agent_text_delta 1\n"
    env = Envelope.parse((header + frame).encode())
    assert env.nbytes == len(frame.encode()) > len(frame)
    assert Envelope.from_history(AGENT, "e", 1, frame).nbytes == len(frame.encode())


async def test_busy_writers_take_turns(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    """A send to a socket with room never suspends, so without turns the first
    writer with a full queue would hold the event loop for its whole queue,
    starving every other client, pings and the delivery probe."""
    from relay.gateway.sendqueue import SendTurns
    from relay.gateway.store import RequestStore
    from relay.wire.keys import Keys

    order: list[str] = []

    class Sink:
        def __init__(self, name: str) -> None:
            self.name = name

        async def send_text(self, text: str) -> None:
            order.append(self.name)

    turns = SendTurns(frames_per_round=1)  # yield after every frame
    store = RequestStore(fake_redis, Keys())
    tasks = []
    for name in ("a", "b"):
        tasks.append(asyncio.create_task(busy_writer(Sink(name), turns, store, 1000, 200).run()))
    try:
        async with asyncio.timeout(5):
            while len(order) < 400:
                await asyncio.sleep(0.001)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert set(order[:20]) == {"a", "b"}, order[:20]
    assert turns.pending == 0


async def test_turns_count_queues_with_work_not_running_writers(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    """Writers run one after another in a round, so only one of them is ever
    running: the share must come from how many have work waiting, or each
    writer thinks it is alone and drains its whole queue (a round of 300
    writers then took seconds under overload)."""
    from relay.gateway.sendqueue import SendTurns
    from relay.gateway.store import RequestStore
    from relay.wire.keys import Keys

    order: list[int] = []

    class Sink:
        def __init__(self, n: int) -> None:
            self.n = n

        async def send_text(self, text: str) -> None:
            order.append(self.n)

    turns = SendTurns(frames_per_round=256, min_frames=TURN_FRAMES)
    assert TURN_FRAMES == 8  # what the profile chose (sendqueue.py)
    store = RequestStore(fake_redis, Keys())
    writers, tasks = 300, []
    for n in range(writers):
        tasks.append(asyncio.create_task(busy_writer(Sink(n), turns, store, 100, 20).run()))
    assert turns.pending == writers
    try:
        async with asyncio.timeout(5):
            while len(order) < writers * 20:
                await asyncio.sleep(0.001)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # The first round: the least turn (TURN_FRAMES) from each writer, not
    # twenty from a few, nor one from each (a task switch per frame).
    first = order[: writers * TURN_FRAMES]
    assert first == [n for n in range(writers) for _ in range(TURN_FRAMES)], Counter(first)
    assert turns.pending == 0


async def test_a_pass_of_the_loop_sends_about_frames_per_round_however_long_the_turns(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    """Writers that queue for turns are admitted by the frames they will send,
    not by count: at TURN_FRAMES per turn, admitting frames_per_round writers
    per pass made each pass eight times as long."""
    from relay.gateway.sendqueue import SendTurns
    from relay.gateway.store import RequestStore
    from relay.wire.keys import Keys

    sent = 0

    class Sink:
        async def send_text(self, text: str) -> None:
            nonlocal sent
            sent += 1

    turns = SendTurns(frames_per_round=256)
    store = RequestStore(fake_redis, Keys())
    writers = 300
    tasks = [
        asyncio.create_task(busy_writer(Sink(), turns, store, 100, 60).run())
        for _ in range(writers)
    ]
    passes: list[int] = []
    try:
        async with asyncio.timeout(5):
            while sent < writers * 60:
                passes.append(sent)
                await asyncio.sleep(0)  # once per pass of the loop
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # After the first pass (every writer starts at once), frames per pass:
    per_pass = [b - a for a, b in pairwise(passes[1:])]
    assert per_pass and max(per_pass) <= 256 + TURN_FRAMES, max(per_pass)


def busy_writer(sink: Any, turns: Any, store: Any, queue_max: int, events: int) -> Any:
    """A writer whose queue already holds ``events`` events of one request."""
    queue = SendQueue(queue_max, 1 << 24, "drop_oldest", Metrics(), turns=turns)
    rid = str(uuid.uuid4())
    for seq in range(1, events + 1):
        queue.push_event(Envelope(rid, seq, "e", "agent_text_delta", "{}", nbytes=2))
    return ordered_writer(sink, queue, store, subscribed=False)


def ordered_writer(sink: Any, queue: SendQueue, store: Any, *, subscribed: bool) -> Any:
    """An OrderedWriter of ``queue`` to ``sink`` that wants every request."""
    from relay.config import GlobalConfig
    from relay.gateway.writer import OrderedWriter

    return OrderedWriter(
        sink,
        queue,
        store,
        GlobalConfig(),
        Metrics(),
        wants=lambda r: True,
        subscribed=lambda r: subscribed,
        runs=set(),
    )
