"""Failure handling against real processes: Redis restarts, dead gateways, killed
pub/sub connections, late subscribers and trimmed history.

Every stream here is checked the same way: what a client received for a
request is exactly ``1..N`` (no gap, no duplicate, in order), or, when Redis
lost the stream, a ``resync_required`` followed by a contiguous new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.config import HistoryConfig
from relay.orchestrator.client import Published, RelayClient
from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def delta(text: str = "x") -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


def seqs(frames: list[dict[str, Any]], rid: str) -> list[int]:
    return [f["seq"] for f in frames if f.get("request_id") == rid and "seq" in f and "ts" in f]


@dataclass
class Stream:
    """Publishes ``total`` events to one request at a fixed rate, recording each result."""

    url: str
    rid: str
    total: int
    rate: float
    history: HistoryConfig | None = None
    published: list[Published] = field(default_factory=list)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with RelayClient.from_url(self.url, history=self.history) as pub:
            start = loop.time()
            for i in range(self.total):
                ahead = start + i / self.rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                self.published.append(await pub.publish_many(self.rid, [delta(str(i))]))

    async def reach(self, count: int) -> None:
        await eventually(lambda: len(self.published) >= count, 30, f"{count} publishes")


@contextlib.asynccontextmanager
async def clients(gateways: list[Gateway], rid: str) -> AsyncIterator[list[WsClient]]:
    """One firehose and one narrowed client on every gateway, all live."""
    made: list[WsClient] = []
    try:
        for gw in gateways:
            fire, narrow = WsClient(gw.ws_url), WsClient(gw.ws_url)
            made += [fire, narrow]
            await fire.__aenter__()
            await narrow.__aenter__()
            assert (await fire.request({"type": "ping"}, "pong"))["type"] == "pong"
            reply = await narrow.request({"type": "subscribe", "request_id": rid}, "subscribed")
            assert reply["type"] == "subscribed"
        yield made
    finally:
        for client in made:
            await client.close()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with ``appendonly yes`` (fsync always): restarts keep every key."""
    server = RedisServer(tmp_path / "aof-redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def start_on(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(redis: RedisServer, extra_env: dict[str, str] | None = None) -> Gateway:
        gw = Gateway(redis.url, tmp_path / f"gw-{len(started)}.log", extra_env)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


# ------------------------------------------------------------------ Redis restart


async def test_redis_restart_with_persistence_loses_nothing(
    aof_redis: RedisServer, start_on: Callable[..., Gateway]
) -> None:
    gws = [start_on(aof_redis), start_on(aof_redis)]
    rid = str(uuid.uuid4())
    total = 5000
    stream = Stream(aof_redis.url, rid, total, rate=500)
    async with clients(gws, rid) as cs:
        publisher = asyncio.create_task(stream.run())
        await stream.reach(2000)
        await asyncio.to_thread(aof_redis.restart, 0.3)
        await publisher
        assert [p.last_seq for p in stream.published] == list(range(1, total + 1))
        assert len({p.epoch for p in stream.published}) == 1
        for client in cs:
            await client.wait_for(lambda c: len(c.events(rid)) >= total, timeout=20)
        for n, client in enumerate(cs):
            assert seqs(client.frames, rid) == list(range(1, total + 1)), f"client {n}"
            assert not client.of_type("resync_required"), client.of_type("resync_required")
            assert not client.of_type("error")
        for gw in gws:
            status, body = gw.get("/readyz")
            assert status == 200 and body["reconnects"] >= 1, body


async def test_redis_restart_without_persistence_tells_every_client_to_resync(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gws = [start_gateway(), start_gateway()]
    rid = str(uuid.uuid4())
    total = 1500
    stream = Stream(redis_server.url, rid, total, rate=500)
    async with clients(gws, rid) as cs:
        publisher = asyncio.create_task(stream.run())
        await stream.reach(500)
        await asyncio.to_thread(redis_server.restart, 0.3)
        await publisher
        epochs = [p.epoch for p in stream.published]
        old, new = epochs[0], epochs[-1]
        assert old != new
        # The data was lost: the stream starts over at seq 1 in a new epoch.
        after = [p.last_seq for p in stream.published if p.epoch == new]
        assert after == list(range(1, len(after) + 1))
        for client in cs:
            await client.wait_for(
                lambda c: (
                    bool(c.of_type("resync_required"))
                    and seqs(c.frames[c.frames.index(c.of_type("resync_required")[0]) :], rid)[-1:]
                    == [len(after)]
                ),
                timeout=20,
            )
        for n, client in enumerate(cs):
            resyncs = client.of_type("resync_required")
            assert len(resyncs) == 1, (n, resyncs)
            assert resyncs[0]["request_id"] == rid
            assert resyncs[0]["reason"] == "epoch_changed"
            assert resyncs[0]["epoch"] == new
            cut = client.frames.index(resyncs[0])
            before = seqs(client.frames[:cut], rid)
            # What arrived of the lost epoch is a gap-free prefix ...
            assert before == list(range(1, len(before) + 1)), n
            assert len(before) >= 400
            # ... and the new epoch is complete from seq 1.
            assert seqs(client.frames[cut:], rid) == list(range(1, len(after) + 1)), n


# ------------------------------------------------------------------ gateway death


async def test_gateway_sigkill_clients_resume_on_the_other(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    survivor, victim = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    total = 1500
    stream = Stream(redis_server.url, rid, total, rate=500)
    async with clients([survivor, victim], rid) as cs:
        moved = cs[2:]  # the victim's firehose and narrowed clients
        publisher = asyncio.create_task(stream.run())
        await stream.reach(400)
        await eventually(lambda: all(len(c.events(rid)) >= 300 for c in moved), 10, "traffic")
        victim.stop(signal.SIGKILL)
        for client in moved:
            await asyncio.wait_for(client.closed.wait(), 10)
        # Resume on the survivor from the last seq each one saw: one with the
        # subscribe command, one with the connect-time query parameters.
        last = [seqs(c.frames, rid)[-1] for c in moved]
        first = WsClient(survivor.ws_url)
        second = WsClient(f"{survivor.ws_url}?request_id={rid}&after_seq={last[1]}")
        async with first, second:
            reply = await first.request(
                {"type": "subscribe", "request_id": rid, "after_seq": last[0]}, "subscribed"
            )
            assert reply["type"] == "subscribed"
            await publisher
            for client in (first, second, cs[0], cs[1]):
                await client.wait_for(lambda c: total in seqs(c.frames, rid), timeout=20)
            for n, (old, new) in enumerate(zip(moved, (first, second), strict=True)):
                # `first` connected on the firehose and narrowed itself: what
                # it got before the "subscribed" reply is firehose traffic,
                # the resumed stream starts after that reply.
                start = new.frames.index(new.of_type("subscribed")[0])
                combined = seqs(old.frames, rid) + seqs(new.frames[start:], rid)
                assert combined == list(range(1, total + 1)), n
                assert not new.of_type("resync_required") and not new.of_type("error")
            for client in cs[:2]:
                assert seqs(client.frames, rid) == list(range(1, total + 1))


# ------------------------------------------------------------------ pub/sub connection


async def test_pubsub_connection_killed_by_redis_is_rebuilt_without_loss(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gws = [start_gateway(), start_gateway()]
    rid = str(uuid.uuid4())
    total = 1500
    stream = Stream(redis_server.url, rid, total, rate=500)
    async with clients(gws, rid) as cs:
        publisher = asyncio.create_task(stream.run())
        await stream.reach(500)
        killed_at = time.monotonic()
        out = redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(out.strip() or b"0") == 2  # one pub/sub connection per gateway

        def recovered(gw: Gateway) -> bool:
            status, body = gw.get("/readyz")
            return status == 200 and body["reconnects"] >= 1 and body["pubsub_connected"]

        for gw in gws:
            await eventually(lambda g=gw: recovered(g), 5, "readyz after reconnect")
        # Probe interval 0.5 s, timeout 1 s in these gateways.
        assert time.monotonic() - killed_at < 2.5
        await publisher
        for client in cs:
            await client.wait_for(lambda c: total in seqs(c.frames, rid), timeout=20)
        for n, client in enumerate(cs):
            assert seqs(client.frames, rid) == list(range(1, total + 1)), n
            assert not client.of_type("resync_required")
        assert len(pubsub_holders(redis_server)) == 2


def pubsub_holders(redis: RedisServer) -> list[str]:
    lines = redis.command("CLIENT", "LIST").decode().splitlines()
    return [ln for ln in lines if " sub=0 " not in ln or " psub=0 " not in ln]


async def test_frozen_redis_is_detected_by_the_probe(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """A pub/sub connection that stays open but delivers nothing (the server is
    frozen) is declared dead by the delivery probe: /readyz goes 503, then 200."""
    gw = start_gateway()
    rid = str(uuid.uuid4())
    total = 600
    stream = Stream(redis_server.url, rid, total, rate=300)
    async with clients([gw], rid) as cs:
        publisher = asyncio.create_task(stream.run())
        await stream.reach(100)
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: gw.get("/readyz")[0] == 503, 5, "readyz 503 while frozen")
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: gw.get("/readyz")[0] == 200, 10, "readyz 200 after thaw")
        await publisher
        for client in cs:
            await client.wait_for(lambda c: total in seqs(c.frames, rid), timeout=20)
        for n, client in enumerate(cs):
            assert seqs(client.frames, rid) == list(range(1, total + 1)), n


# ------------------------------------------------------------------ late subscribers


def spawned(agent: str, parent: str | None, depth: int, index: int, total: int) -> dict[str, Any]:
    return {
        "type": "agent_spawned",
        "agent_id": agent,
        "parent_id": parent,
        "task_description": f"task of {agent[:8]}",
        "depth": depth,
        "index": index,
        "total": total,
    }


def completed(agent: str, tokens: int) -> dict[str, Any]:
    return {
        "type": "agent_completed",
        "agent_id": agent,
        "result_summary": "done",
        "tokens_used": tokens,
        "duration_ms": 1200,
    }


async def test_late_subscriber_gets_snapshot_then_live(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    root, child_a, child_b = (str(uuid.uuid4()) for _ in range(3))
    budget = {"request_id": rid, "budget_total": 500_000}
    async with RelayClient.from_url(redis_server.url) as pub:
        await pub.publish(rid, spawned(root, None, 0, 0, 1))
        await pub.publish_many(
            rid, [spawned(child_a, root, 1, 0, 2), spawned(child_b, root, 1, 1, 2)]
        )
        await pub.publish_text_deltas(rid, child_a, ["hel", "lo"])
        await pub.publish(
            rid, {"type": "budget_update", **budget, "tokens_used": 1500, "percentage": 0.3}
        )
        await pub.publish(rid, completed(child_a, 1500))
        await pub.publish(
            rid, {"type": "agent_failed", "agent_id": child_b, "error": "boom", "will_retry": False}
        )
        await pub.publish(rid, completed(root, 1800))
        head = await pub.publish(
            rid, {"type": "budget_update", **budget, "tokens_used": 1800, "percentage": 0.36}
        )

        async with WsClient(gw.ws_url) as late:
            before = len(late.frames)
            await late.send({"type": "subscribe", "request_id": rid, "snapshot": True})
            await late.wait_for(lambda c: bool(c.of_type("snapshot")))
            snap = late.of_type("snapshot")[0]
            kinds = [f["type"] for f in late.frames[before:]]
            assert kinds[:2] == ["subscribed", "snapshot"]
            assert snap["seq"] == head == 10
            assert snap["request_id"] == rid and snap["epoch"]
            agents = {a["agent_id"]: a for a in snap["agents"]}
            assert [a["agent_id"] for a in snap["agents"]] == [root, child_a, child_b]
            assert agents[root]["parent_id"] is None
            assert agents[child_a]["parent_id"] == root
            assert agents[child_a]["status"] == "completed"
            assert agents[child_a]["tokens_used"] == 1500
            assert agents[child_b]["status"] == "failed"
            assert agents[root]["status"] == "completed"
            assert snap["budget"]["tokens_used"] == 1800
            assert snap["budget"]["budget_total"] == 500_000
            assert snap["outcome"]["status"] == "completed"
            assert snap["outcome"]["agent_id"] == root

            for i in range(20):
                await pub.publish(rid, delta(f"live {i}"))
            await late.wait_for(lambda c: len(c.events(rid)) >= 20)
            assert seqs(late.frames, rid) == list(range(head + 1, head + 21))


async def test_resume_from_trimmed_history_requires_resync(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    history = HistoryConfig(max_events=50)
    gw = start_gateway({"RELAY_HISTORY_MAX_EVENTS": "50"})
    rid = str(uuid.uuid4())
    async with RelayClient.from_url(redis_server.url, history=history) as pub:
        for _ in range(4):
            await pub.publish_many(rid, [delta() for _ in range(50)])
        assert await pub.redis.xlen(f"relay:default:req:{{{rid}}}:history") == 50

        async with WsClient(gw.ws_url) as stale, WsClient(gw.ws_url) as recent:
            await stale.send({"type": "subscribe", "request_id": rid, "after_seq": 10})
            await stale.wait_for(lambda c: bool(c.of_type("resync_required")))
            frame = stale.of_type("resync_required")[0]
            assert frame["reason"] == "history_trimmed"
            assert frame["request_id"] == rid
            assert frame["first_available_seq"] == 151
            assert stale.events(rid) == []

            await recent.send({"type": "subscribe", "request_id": rid, "after_seq": 170})
            await recent.wait_for(lambda c: len(c.events(rid)) >= 30)
            assert seqs(recent.frames, rid) == list(range(171, 201))

            # Both carry on live, without a gap, after the resync point.
            await pub.publish(rid, delta("live"))
            await stale.wait_for(lambda c: 201 in seqs(c.frames, rid))
            await recent.wait_for(lambda c: 201 in seqs(c.frames, rid))
            assert seqs(stale.frames, rid) == [201]
            assert seqs(recent.frames, rid) == list(range(171, 202))


# ------------------------------------------------------------------ publisher retries


class LossyProxy:
    """A TCP proxy in front of redis-server that, when armed, drops the next
    reply and cuts the client off: the command ran, the publisher never heard."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.cut = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LossyProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._pipe(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)

        async def up() -> None:
            while data := await cr.read(65536):
                sw.write(data)
                await sw.drain()

        async def down() -> None:
            while data := await sr.read(65536):
                if self.armed:
                    self.armed = False
                    self.cut += 1
                    cw.transport.abort()
                    return
                cw.write(data)
                await cw.drain()

        pumps = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (cw, sw):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


async def test_publish_whose_reply_is_lost_is_applied_once(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    async with (
        LossyProxy(redis_server.port) as proxy,
        RelayClient.from_url(proxy.url) as pub,
        WsClient(f"{gw.ws_url}?request_id={rid}") as client,
    ):
        await client.request({"type": "ping"}, "pong")
        assert await pub.publish(rid, delta("one")) == 1
        for expected in (2, 3, 4):
            proxy.armed = True
            # The script ran, the reply was lost; the retry must not run it again.
            assert await pub.publish(rid, delta("lost reply")) == expected
        assert proxy.cut == 3
        assert await pub.publish(rid, delta("five")) == 5
        await client.wait_for(lambda c: len(c.events(rid)) >= 5)
        assert seqs(client.frames, rid) == [1, 2, 3, 4, 5]
        assert await pub.redis.xlen(f"relay:default:req:{{{rid}}}:history") == 5


async def test_client_connecting_during_an_outage_is_served_once_redis_is_back(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway({"RELAY_REDIS_SOCKET_TIMEOUT": "1"})
    rid = str(uuid.uuid4())
    redis_server.stop()
    await eventually(lambda: gw.get("/readyz")[0] == 503, 10, "readyz 503 while Redis is down")
    async with WsClient(gw.ws_url) as client:
        # Told that the stream is unavailable right now, but not forgotten.
        await client.wait_for(lambda c: bool(c.of_type("error")), timeout=10)
        assert client.of_type("error")[0]["code"] == "unavailable"
        await asyncio.to_thread(redis_server.start)
        await eventually(lambda: gw.get("/readyz")[0] == 200, 10, "readyz 200 after Redis is back")
        async with RelayClient.from_url(redis_server.url) as pub:
            await pub.publish(rid, delta("after the outage"))
        await client.wait_for(lambda c: seqs(c.frames, rid) == [1], timeout=10)
