"""SSE streams: ids, Last-Event-ID resume, heartbeats, bounded slow clients, shutdown.

The connection under test is the real :class:`SseConnection` over a real
:class:`SseSocket`; only the ASGI server is a fake (its sends can be stalled
to play a client that stops reading), the hub is the recorder of
``test_connection`` and Redis is fakeredis with the real publish script.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import fakeredis
import pytest
from starlette.datastructures import QueryParams
from starlette.websockets import WebSocket

from relay.config import GatewayConfig, GlobalConfig, HistoryConfig, SseConfig
from relay.gateway.envelope import Envelope
from relay.gateway.guard import HttpRefusal
from relay.gateway.metrics import Metrics
from relay.gateway.sse import (
    BadEventId,
    Drain,
    SseConnection,
    SseSocket,
    decode_id,
    encode_id,
    frame_type,
    sse_message,
    stream_query,
)
from relay.gateway.store import RequestStore
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys
from tests.sseclient import Message, parse_stream
from tests.unit.test_connection import RecordingHub

AGENT = str(uuid.uuid4())


class FakeAsgi:
    """The server side of one HTTP response; ``flowing`` cleared stalls every send."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.body = bytearray()
        self.complete = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        await self.flowing.wait()
        self.body += message["body"]
        if not message.get("more_body", False):
            self.complete = True

    def messages(self) -> list[Message]:
        return parse_stream(bytes(self.body))

    def events(self, rid: str) -> list[Message]:
        return [m for m in self.messages() if m.data and "ts" in m.frame() and rid in m.data[0]]

    def seqs(self, rid: str) -> list[int]:
        return [m.frame()["seq"] for m in self.events(rid)]

    def of_event(self, name: str) -> list[Message]:
        return [m for m in self.messages() if m.event == name]

    def headers(self) -> dict[str, str]:
        assert self.start is not None
        return {k.decode(): v.decode() for k, v in self.start["headers"]}


@dataclass
class Stream:
    asgi: FakeAsgi
    sock: SseSocket
    conn: SseConnection
    metrics: Metrics
    task: asyncio.Task[None]

    def last_id(self) -> str:
        ids = [m.id for m in self.asgi.messages() if m.id is not None]
        return ids[-1]


class World:
    """One fake Redis with the real publish script, and the streams opened on it."""

    def __init__(self, redis: fakeredis.FakeAsyncRedis, history: HistoryConfig) -> None:
        self.redis = redis
        self.history = history
        self.client = RelayClient(redis, history=history, owns_connection=False)
        self.store = RequestStore(redis, Keys(), 50)
        self.hub = RecordingHub(self.store)

    async def publish(self, rid: str, n: int) -> list[Envelope]:
        """Publish n deltas; their envelopes as the hub hands them out (what history holds)."""
        for i in range(n):
            await self.client.publish(
                rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": f"t{i}"}
            )
        pos = await self.store.position(rid)
        assert pos.epoch is not None
        out: list[Envelope] = []
        with contextlib.suppress(Exception):
            async for batch in self.store.replay(rid, pos.epoch, pos.seq - n):
                out.extend(batch)
        return out

    @contextlib.asynccontextmanager
    async def stream(
        self,
        params: dict[str, str],
        last_event_id: str | None = None,
        *,
        heartbeat: float = 60.0,
        drain: Drain | None = None,
        **gateway: Any,
    ) -> AsyncIterator[Stream]:
        config = GlobalConfig(
            gateway=GatewayConfig(**gateway), history=self.history, sse=SseConfig()
        )
        rid, query = stream_query(QueryParams(params), last_event_id)
        asgi = FakeAsgi()
        sock = SseSocket(
            asgi.receive,
            asgi.send,  # type: ignore[arg-type]
            request_id=rid,
            query=query,
            client=None,
            retry_ms=1500,
            heartbeat_interval=heartbeat,
            stall_timeout=config.gateway.ping_timeout,
            drain=drain,
        )

        async def no_handler(command: Any, principal: Any) -> dict[str, Any]:
            raise AssertionError("SSE sends no commands")

        metrics = Metrics()
        conn = SseConnection(cast(WebSocket, sock), self.hub, config, metrics, no_handler)  # type: ignore[arg-type]

        async def run() -> None:
            try:
                await conn.run()
            finally:
                await sock.finish()

        task = asyncio.create_task(run())
        stream = Stream(asgi, sock, conn, metrics, task)
        await until(lambda: bool(asgi.of_event("subscribed")))
        try:
            yield stream
        finally:
            asgi.flowing.set()
            asgi.gone.set()
            await asyncio.wait_for(task, 5)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
def world(fake_redis: fakeredis.FakeAsyncRedis) -> World:
    return World(fake_redis, HistoryConfig())


# ---------------------------------------------------------------- framing


def test_ids_round_trip_and_bad_ids_are_refused() -> None:
    assert encode_id("a1b2c3d4e5f6", 42) == "a1b2c3d4e5f6:42"
    assert decode_id("a1b2c3d4e5f6:42") == ("a1b2c3d4e5f6", 42)
    assert decode_id(encode_id(None, 0)) == (None, 0)
    for bad in ("", "42", "e:", "e:-1", "e:4x", "a:b:c", "e poch:1", "e:" + "9" * 30):
        with pytest.raises(BadEventId):
            decode_id(bad)


def test_messages_carry_the_frame_text_unchanged() -> None:
    frame = '{"type":"agent_text_delta","text":"a\\nb","seq":3}'
    assert sse_message(frame, event="agent_text_delta", event_id="e:3") == (
        b"id: e:3\nevent: agent_text_delta\ndata: " + frame.encode() + b"\n\n"
    )
    # A pretty-printed frame (another publisher) becomes several data lines
    # that the browser joins back into the same JSON.
    pretty = '{\n  "type": "x"\n}'
    (msg,) = parse_stream(sse_message(pretty, event="x"))
    assert msg.frame() == {"type": "x"} and len(msg.data) == 3
    assert frame_type('{"type":"subscribed","seq":1}') == "subscribed"
    assert frame_type('{"seq":1,"type":"snapshot"}') == "snapshot"
    assert frame_type("[]") == "message"


def test_stream_query_takes_last_event_id_over_the_url() -> None:
    rid = str(uuid.uuid4())
    params = QueryParams({"request_id": rid.upper(), "after_seq": "0", "snapshot": "1"})
    got_rid, query = stream_query(params, None)
    assert got_rid == rid and query["after_seq"] == "0" and query["snapshot"] == "1"
    _, query = stream_query(params, "abc123:57")
    assert dict(query) == {"request_id": rid, "after_seq": "57", "epoch": "abc123"}
    _, query = stream_query(params, "  ")  # an empty header is no header
    assert query["after_seq"] == "0"


@pytest.mark.parametrize(
    ("params", "last_event_id", "code"),
    [
        ({"request_id": "R"}, "garbage", "invalid_last_event_id"),
        ({"request_id": "R"}, "e:-3", "invalid_last_event_id"),
        ({}, None, "invalid_field"),
        ({"request_id": "not-a-uuid"}, None, "invalid_uuid"),
        ({"request_id": "R", "after_seq": "x"}, None, "invalid_field"),
        ({"request_id": "R", "after_seq": "-1"}, None, "invalid_field"),
    ],
)
def test_bad_parameters_are_400(
    params: dict[str, str], last_event_id: str | None, code: str
) -> None:
    rid = str(uuid.uuid4())
    query = QueryParams({k: rid if v == "R" else v for k, v in params.items()})
    with pytest.raises(HttpRefusal) as refused:
        stream_query(query, last_event_id)
    assert refused.value.status == 400 and refused.value.code == code


def test_two_request_ids_are_400() -> None:
    query = QueryParams([("request_id", str(uuid.uuid4())), ("request_id", str(uuid.uuid4()))])
    with pytest.raises(HttpRefusal) as refused:
        stream_query(query, None)
    assert refused.value.status == 400


# ---------------------------------------------------------------- streams


async def test_events_carry_epoch_seq_ids_type_and_the_same_frame(world: World) -> None:
    rid = str(uuid.uuid4())
    envs = await world.publish(rid, 3)
    epoch = envs[0].epoch
    async with world.stream({"request_id": rid, "after_seq": "0"}) as s:
        await until(lambda: s.asgi.seqs(rid) == [1, 2, 3])
        headers = s.asgi.headers()
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        messages = s.asgi.messages()
        assert messages[0].retry == "1500"
        sub = s.asgi.of_event("subscribed")[0]
        assert sub.id == f"{epoch}:0" and sub.frame()["seq"] == 3
        events = s.asgi.events(rid)
        assert [m.id for m in events] == [f"{epoch}:{n}" for n in (1, 2, 3)]
        assert [m.event for m in events] == ["agent_text_delta"] * 3
        assert ["\n".join(m.data) for m in events] == [e.frame for e in envs]


async def test_last_event_id_resumes_exactly_after_the_last_message(world: World) -> None:
    rid = str(uuid.uuid4())
    url = {"request_id": rid, "after_seq": "0", "snapshot": "1"}  # what a page opened with
    async with world.stream({"request_id": rid, "after_seq": "0"}) as first:
        for env in await world.publish(rid, 5):
            first.conn.offer(env)
        await until(lambda: first.asgi.seqs(rid) == [1, 2, 3, 4, 5])
        last = first.last_id()
    await world.publish(rid, 5)  # while the browser is away
    async with world.stream(url, last) as second:
        for env in await world.publish(rid, 2):
            second.conn.offer(env)
        await until(lambda: second.asgi.seqs(rid)[-1:] == [12])
        assert second.asgi.seqs(rid) == list(range(6, 13))
        assert not second.asgi.of_event("snapshot")  # the header replaced snapshot=1
    assert first.asgi.seqs(rid) + second.asgi.seqs(rid) == list(range(1, 13))


async def test_the_subscribed_id_resumes_a_client_that_got_no_event(world: World) -> None:
    rid = str(uuid.uuid4())
    await world.publish(rid, 3)
    async with world.stream({"request_id": rid}) as first:
        sub = first.asgi.of_event("subscribed")[0]
        assert sub.id is not None and sub.id.endswith(":3")
    await world.publish(rid, 2)
    async with world.stream({"request_id": rid}, sub.id) as second:
        await until(lambda: second.asgi.seqs(rid) == [4, 5])


async def test_epoch_mismatch_is_resync_required(world: World) -> None:
    rid = str(uuid.uuid4())
    envs = await world.publish(rid, 4)
    async with world.stream({"request_id": rid}, "0ldepoch:2") as s:
        await until(lambda: bool(s.asgi.of_event("resync_required")))
        resync = s.asgi.of_event("resync_required")[0]
        assert resync.frame()["reason"] == "epoch_changed"
        assert resync.id == f"{envs[0].epoch}:4"  # where the new stream stands
        assert s.asgi.seqs(rid) == []


async def test_trimmed_history_is_resync_required(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    world = World(fake_redis, HistoryConfig(max_events=5))
    rid = str(uuid.uuid4())
    await world.publish(rid, 20)
    epoch = (await world.store.position(rid)).epoch
    async with world.stream({"request_id": rid}, f"{epoch}:1") as s:
        await until(lambda: bool(s.asgi.of_event("resync_required")))
        frame = s.asgi.of_event("resync_required")[0].frame()
        assert frame["reason"] == "history_trimmed"


async def test_heartbeat_comments_while_quiet(world: World) -> None:
    rid = str(uuid.uuid4())
    async with world.stream({"request_id": rid}, heartbeat=0.05) as s:

        def beats() -> int:
            return sum(m.comments.count("heartbeat") for m in s.asgi.messages())

        await until(lambda: beats() >= 3)


async def test_slow_sse_client_has_a_bounded_queue_then_catches_up(world: World) -> None:
    rid = str(uuid.uuid4())
    async with world.stream({"request_id": rid}, send_queue_max=10) as s:
        first = await world.publish(rid, 1)
        s.conn.offer(first[0])
        await until(lambda: s.asgi.seqs(rid) == [1])
        s.asgi.flowing.clear()  # the client stops reading
        for env in await world.publish(rid, 200):
            s.conn.offer(env)
            assert len(s.conn._queue) <= 10  # bounded while stalled
        assert s.metrics.queue_drops._value.get() >= 180
        s.asgi.flowing.set()
        await until(lambda: s.asgi.seqs(rid)[-1:] == [201])
        assert s.asgi.seqs(rid) == list(range(1, 202))  # continuous, exactly once
        lagged = s.asgi.of_event("lagged")
        assert lagged and lagged[0].frame()["skipped"] >= 180


async def test_close_policy_ends_the_stream_with_1013(world: World) -> None:
    rid = str(uuid.uuid4())
    async with world.stream({"request_id": rid}, send_queue_max=5, overflow_policy="close") as s:
        s.asgi.flowing.clear()
        for env in await world.publish(rid, 20):
            s.conn.offer(env)
        s.asgi.flowing.set()
        await until(lambda: s.asgi.complete)
        assert s.asgi.of_event("close")[0].frame()["code"] == 1013


async def test_a_client_that_reads_nothing_is_dropped(world: World) -> None:
    rid = str(uuid.uuid4())
    async with world.stream({"request_id": rid}, ping_timeout=0.2) as s:
        s.asgi.flowing.clear()
        for env in await world.publish(rid, 3):
            s.conn.offer(env)
        await asyncio.wait_for(asyncio.shield(s.task), 5)  # ended by itself
        assert not world.hub.watched[rid]  # interest released
        assert not s.asgi.complete  # nothing could be written; the server drops it


async def test_drain_ends_every_stream_with_a_close_event(world: World) -> None:
    rid = str(uuid.uuid4())
    drain = Drain()
    async with world.stream({"request_id": rid}, drain=drain) as s:
        assert len(drain) == 1
        drain.start()
        await asyncio.wait_for(asyncio.shield(s.task), 5)
        assert s.asgi.complete
        assert s.asgi.of_event("close")[0].frame()["code"] == 1012
        assert len(drain) == 0 and not world.hub.watched[rid]
