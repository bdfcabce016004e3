"""One client connection: ordering, dedup, gap refill, overflow policies, resync.

The hub is replaced by a recorder (the connection only needs watch/unwatch and
the store); Redis is fakeredis with the real publish script; the WebSocket is
a fake whose sends can be stalled to play a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import fakeredis
import pytest
from starlette.datastructures import QueryParams
from starlette.websockets import WebSocketState

from relay.config import GatewayConfig, GlobalConfig, HistoryConfig
from relay.gateway.connection import Connection
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.store import RequestStore
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys

AGENT = str(uuid.uuid4())


class FakeWebSocket:
    def __init__(self, query: str = "") -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.query_params = QueryParams(query)
        self.application_state = WebSocketState.CONNECTING
        self.close_code: int | None = None
        self.client = None  # no peer address: per-subject limits key on "ip:unknown"

    async def accept(self, subprotocol: str | None = None) -> None:
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        await self.flowing.wait()
        self.sent.append(json.loads(text))

    async def close(self, code: int, reason: str = "") -> None:
        self.close_code = code
        self.application_state = WebSocketState.DISCONNECTED
        await self.incoming.put({"type": "websocket.disconnect", "code": code})

    def client_sends(self, frame: dict[str, Any]) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    def events(self, rid: str) -> list[int]:
        return [f["seq"] for f in self.sent if f.get("request_id") == rid and "ts" in f]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("type") == kind]


class RecordingHub:
    def __init__(self, store: RequestStore) -> None:
        self.store = store
        self.watched: dict[str, set[Any]] = {}
        self.firehose: set[Any] = set()

    async def watch(self, rid: str, sub: Any) -> None:
        self.watched.setdefault(rid, set()).add(sub)

    async def unwatch(self, rid: str, sub: Any) -> None:
        self.watched.get(rid, set()).discard(sub)

    async def watch_all(self, sub: Any) -> None:
        self.firehose.add(sub)

    async def unwatch_all(self, sub: Any) -> None:
        self.firehose.discard(sub)


class Harness:
    def __init__(self, redis: fakeredis.FakeAsyncRedis, gateway: GatewayConfig,
                 history: HistoryConfig, query: str = "") -> None:  # fmt: skip
        self.redis = redis
        self.config = GlobalConfig(gateway=gateway, history=history)
        self.client = RelayClient(redis, history=history, owns_connection=False)
        self.hub = RecordingHub(RequestStore(redis, Keys(), 50))
        self.ws = FakeWebSocket(query)

        async def no_handler(command: Any) -> dict[str, Any]:
            raise AssertionError("not expected")

        self.conn = Connection(self.ws, self.hub, self.config, Metrics(), no_handler)  # type: ignore[arg-type]

    async def publish(self, rid: str, n: int) -> list[Envelope]:
        """Publish n deltas and return their envelopes as the hub would hand them out."""
        out = []
        for i in range(n):
            await self.client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT,
                                            "text": f"t{i}"})  # fmt: skip
        pos = await self.hub.store.position(rid)
        assert pos.epoch is not None
        # Only what history still holds (it may be capped smaller than n).
        history = self.client.keys.request(rid).history
        oldest = cast(list[tuple[bytes, Any]], await self.redis.xrange(history, count=1))
        first = int(oldest[0][0].split(b"-")[0])
        async for batch in self.hub.store.replay(rid, pos.epoch, max(pos.seq - n, first - 1)):
            out.extend(batch)
        return out

    async def until(self, predicate: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(
    redis: fakeredis.FakeAsyncRedis,
    query: str = "",
    history: HistoryConfig | None = None,
    **gateway: Any,
) -> AsyncIterator[Harness]:
    h = Harness(redis, GatewayConfig(**gateway), history or HistoryConfig(), query)
    task = asyncio.create_task(h.conn.run())
    await h.until(lambda: h.ws.application_state == WebSocketState.CONNECTED)
    try:
        yield h
    finally:
        h.ws.flowing.set()
        await h.ws.incoming.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 5)


async def test_firehose_by_default_and_duplicates_dropped(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        await h.until(lambda: h.conn in h.hub.firehose)
        envs = await h.publish(rid, 3)
        for env in envs + envs:  # the same events via both channels
            h.conn.offer(env)
        await h.until(lambda: len(h.ws.events(rid)) == 3)
        await asyncio.sleep(0.05)
        assert h.ws.events(rid) == [1, 2, 3]


async def test_a_gap_is_filled_from_history(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        envs = await h.publish(rid, 6)
        h.conn.offer(envs[0])
        h.conn.offer(envs[5])  # 2..5 never arrived live
        await h.until(lambda: len(h.ws.events(rid)) == 6)
        assert h.ws.events(rid) == [1, 2, 3, 4, 5, 6]


async def test_stalled_client_drops_oldest_then_catches_up(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, send_queue_max=10) as h:
        first = await h.publish(rid, 1)
        h.conn.offer(first[0])
        await h.until(lambda: h.ws.events(rid) == [1])
        h.ws.flowing.clear()  # the client stops reading
        envs = await h.publish(rid, 200)
        for env in envs:
            h.conn.offer(env)
        assert len(h.conn._queue) <= 10  # bounded while stalled
        h.ws.flowing.set()
        await h.until(lambda: h.ws.events(rid)[-1:] == [201])
        assert h.ws.events(rid) == list(range(1, 202))  # continuous, no duplicate
        lagged = h.ws.of_type("lagged")
        assert lagged and lagged[0]["request_id"] == rid and lagged[0]["skipped"] >= 180


async def test_queue_is_bounded_by_bytes(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, send_queue_max=10_000, send_queue_max_bytes=2_000) as h:
        h.ws.flowing.clear()
        for env in await h.publish(rid, 100):
            h.conn.offer(env)
        assert h.conn._queue.nbytes <= 2_000


async def test_lag_beyond_history_is_resync_required(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, history=HistoryConfig(max_events=20), send_queue_max=5) as h:
        first = await h.publish(rid, 1)
        h.conn.offer(first[0])
        await h.until(lambda: h.ws.events(rid) == [1])
        h.ws.flowing.clear()
        envs = await h.publish(rid, 100)
        for env in envs:
            h.conn.offer(env)
        h.ws.flowing.set()
        await h.until(lambda: h.ws.events(rid)[-1:] == [101])
        resync = h.ws.of_type("resync_required")
        assert resync and resync[0]["reason"] == "history_trimmed"
        seqs = h.ws.events(rid)
        assert seqs == sorted(set(seqs))  # still ordered, never duplicated


async def test_overflow_policy_close(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, send_queue_max=5, overflow_policy="close") as h:
        h.ws.flowing.clear()
        for env in await h.publish(rid, 20):
            h.conn.offer(env)
        h.ws.flowing.set()
        await h.until(lambda: h.ws.close_code is not None)
        assert h.ws.close_code == 1013


async def test_subscribe_resumes_after_seq_without_gap_or_duplicate(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        envs = await h.publish(rid, 10)
        h.ws.client_sends({"type": "subscribe", "request_id": rid, "after_seq": 4, "command_id": 1})
        await h.until(lambda: bool(h.ws.of_type("subscribed")))
        assert h.conn in h.hub.watched[rid] and h.conn not in h.hub.firehose
        for env in envs[6:] + await h.publish(rid, 2):  # live overlaps the replay
            h.conn.offer(env)
        await h.until(lambda: h.ws.events(rid)[-1:] == [12])
        assert h.ws.events(rid) == list(range(5, 13))
        sub = h.ws.of_type("subscribed")[0]
        assert sub["seq"] == 10 and sub["command_id"] == 1 and sub["epoch"]
        assert h.ws.sent.index(sub) < h.ws.sent.index(next(f for f in h.ws.sent if "ts" in f))


async def test_subscribe_via_query_parameters(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis, query=f"request_id={rid}&after_seq=0") as h:
        await h.until(lambda: bool(h.ws.of_type("subscribed")))
        assert h.conn not in h.hub.firehose
    h2 = Harness(fake_redis, GatewayConfig(), HistoryConfig())
    await h2.publish(rid, 3)
    async with running(fake_redis, query=f"request_id={rid}&after_seq=1") as h:
        await h.until(lambda: h.ws.events(rid) == [2, 3])


async def test_resume_with_a_stale_epoch_is_told_to_resync(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        await h.publish(rid, 3)
        h.ws.client_sends({"type": "subscribe", "request_id": rid, "after_seq": 2, "epoch": "old"})
        await h.until(lambda: bool(h.ws.of_type("resync_required")))
        assert h.ws.of_type("resync_required")[0]["reason"] == "epoch_changed"
        h.ws.client_sends({"type": "subscribe", "request_id": str(uuid.uuid4()), "after_seq": 9})
        await h.until(lambda: len(h.ws.of_type("resync_required")) == 2)
        assert h.ws.of_type("resync_required")[1]["reason"] == "ahead_of_stream"


async def test_stream_reset_restarts_the_sequence(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        for env in await h.publish(rid, 3):
            h.conn.offer(env)
        await h.until(lambda: h.ws.events(rid) == [1, 2, 3])
        await fake_redis.flushall()  # Redis came back empty
        h.conn.stream_reset(rid, None, "epoch_changed")
        for env in await h.publish(rid, 2):
            h.conn.offer(env)
        await h.until(lambda: h.ws.events(rid) == [1, 2, 3, 1, 2])
        assert h.ws.of_type("resync_required")[0]["reason"] == "epoch_changed"


async def test_snapshot_then_live(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        spawned = {"type": "agent_spawned", "agent_id": AGENT, "parent_id": None,
                   "task_description": "t", "depth": 0, "index": 0, "total": 1}  # fmt: skip
        await h.client.publish(rid, spawned)
        h.ws.client_sends({"type": "subscribe", "request_id": rid, "snapshot": True})
        await h.until(lambda: bool(h.ws.of_type("snapshot")))
        snap = h.ws.of_type("snapshot")[0]
        assert snap["seq"] == 1 and snap["agents"][0]["agent_id"] == AGENT
        for env in await h.publish(rid, 1):
            h.conn.offer(env)
        await h.until(lambda: h.ws.events(rid) == [2])


async def test_workflow_filter(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rid, run_a, run_b = (str(uuid.uuid4()) for _ in range(3))
    async with running(fake_redis) as h:
        h.ws.client_sends({"type": "subscribe_workflow", "run_id": run_a})
        await h.until(lambda: bool(h.ws.of_type("workflow_subscribed")))
        for run in (run_a, run_b):
            started = {"type": "workflow_run_started", "run_id": run, "workflow_name": "w",
                       "trigger_type": "manual"}  # fmt: skip
            await h.client.publish(rid, started)
        envs = await h.publish(rid, 1)
        pos = await h.hub.store.position(rid)
        assert pos.epoch
        async for batch in h.hub.store.replay(rid, pos.epoch, 0):
            for env in batch:
                h.conn.offer(env)
        await h.until(lambda: 3 in h.ws.events(rid))
        runs = [f.get("run_id") for f in h.ws.sent if f.get("type") == "workflow_run_started"]
        assert runs == [run_a]
        assert envs[0].seq == 3


@pytest.mark.parametrize("frame", ["{", '{"type":"x"}', "[]"])
async def test_bad_input_is_answered_and_the_connection_kept(
    fake_redis: fakeredis.FakeAsyncRedis, frame: str
) -> None:
    async with running(fake_redis, max_message_bytes=100) as h:
        h.ws.incoming.put_nowait({"type": "websocket.receive", "text": frame})
        h.ws.incoming.put_nowait({"type": "websocket.receive", "text": "x" * 101})
        h.ws.incoming.put_nowait({"type": "websocket.receive", "bytes": b"\xff\xfe"})
        h.ws.client_sends({"type": "ping", "command_id": "p"})
        await h.until(lambda: bool(h.ws.of_type("pong")))
        codes = [f["code"] for f in h.ws.of_type("error")]
        assert len(codes) == 3 and "frame_too_large" in codes and "invalid_json" in codes
        assert h.ws.of_type("pong")[0]["command_id"] == "p"


async def test_redis_trouble_is_answered_not_fatal(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    async with running(fake_redis) as h:

        async def down(rid: str) -> None:
            raise RedisConnectionError("Redis went away")

        monkeypatch.setattr(h.hub.store, "position", down)
        h.ws.client_sends({"type": "subscribe", "request_id": str(uuid.uuid4()), "command_id": 9})
        h.ws.client_sends({"type": "ping"})
        await h.until(lambda: bool(h.ws.of_type("pong")))
        error = h.ws.of_type("error")[0]
        assert error["code"] == "unavailable" and error["command_id"] == 9
        assert h.conn in h.hub.firehose and not h.conn._subs  # back to every event


async def test_unreadable_history_is_a_resync_not_a_hole(
    fake_redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    rid = str(uuid.uuid4())
    async with running(fake_redis) as h:
        envs = await h.publish(rid, 5)

        def down(*args: object, **kwargs: object) -> None:
            raise RedisConnectionError("Redis went away")

        monkeypatch.setattr(h.hub.store, "replay", down)
        h.conn.offer(envs[0])
        h.conn.offer(envs[4])  # 2..4 would need history
        await h.until(lambda: h.ws.events(rid) == [1, 5])
        resync = h.ws.of_type("resync_required")
        assert resync and resync[0]["reason"] == "history_unavailable"
        assert h.ws.sent.index(resync[0]) < len(h.ws.sent) - 1  # before event 5


async def test_subscriptions_per_connection_are_capped(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async with running(fake_redis, max_subscriptions=2) as h:
        for _ in range(3):
            h.ws.client_sends({"type": "subscribe", "request_id": str(uuid.uuid4())})
        await h.until(lambda: bool(h.ws.of_type("error")))
        assert h.ws.of_type("error")[0]["code"] == "too_many_subscriptions"
        assert len(h.conn._subs) == 2
