"""A client that stops reading must cost the gateway bounded memory and nobody else any time.

The stalled client is a real WebSocket client on a socket with a tiny receive
buffer whose frame queue stops the transport after one frame: once the kernel
buffers on both sides are full, the gateway's writes to it block, and every
further event has to go through its bounded send queue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from relay.config import HistoryConfig
from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def payload() -> str:
    """About 1 KB of text that permessage-deflate cannot shrink much."""
    return base64.b64encode(os.urandom(750)).decode()


@contextlib.asynccontextmanager
async def stalled_client(url: str) -> AsyncIterator[ClientConnection]:
    """A connected client that reads nothing until the test iterates it."""
    parsed = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small, fixed receive buffer (no autotuning up to tens of MB), yet big
    # enough for a TCP window scale that lets the resumed reader go fast.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
    ws = await websockets.connect(url, sock=sock, max_queue=16, max_size=None, compression=None)
    try:
        yield ws
    finally:
        await ws.close()


def gateway_rss(gw: Gateway) -> int:
    assert gw.proc is not None
    return int(psutil.Process(gw.proc.pid).memory_info().rss)


def metric(gw: Gateway, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(gw.http + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def publish_bulk(url: str, rid: str, count: int, history: HistoryConfig) -> None:
    async with RelayClient.from_url(url, history=history) as pub:
        agent = str(uuid.uuid4())
        for start in range(0, count, 100):
            n = min(100, count - start)
            await pub.publish_text_deltas(rid, agent, [payload() for _ in range(n)])


async def read_until(
    ws: ClientConnection, last: dict[str, int], timeout: float
) -> list[dict[str, Any]]:
    """Resume reading (with a normal receive buffer) until every request in
    ``last`` has reached that seq."""
    ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    frames: list[dict[str, Any]] = []
    missing = dict(last)
    async with asyncio.timeout(timeout):
        while missing:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if "ts" in frame and missing.get(frame.get("request_id", "")) == frame["seq"]:
                del missing[frame["request_id"]]
    return frames


def event_seqs(frames: list[dict[str, Any]], rid: str) -> list[int]:
    return [f["seq"] for f in frames if f.get("request_id") == rid and "ts" in f]


async def test_stalled_client_is_bounded_and_does_not_delay_others(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway(
        {
            "RELAY_GATEWAY_SEND_QUEUE_MAX": "64",
            "RELAY_GATEWAY_SEND_QUEUE_MAX_BYTES": "262144",
            "RELAY_GATEWAY_PING_INTERVAL": "120",
            # The cache of recent events has a bound of its own (test_shedding).
            "RELAY_GATEWAY_RECENT_EVENTS_PER_REQUEST": "64",
        }
    )
    history = HistoryConfig(max_events=50_000)
    rid = str(uuid.uuid4())
    warmup, flood = 1000, 20_000
    total = warmup + flood
    async with (
        WsClient(f"{gw.ws_url}?request_id={rid}") as narrowed,
        WsClient(gw.ws_url) as firehose,
        stalled_client(f"{gw.ws_url}?request_id={rid}") as stalled,
    ):
        await firehose.request({"type": "ping"}, "pong")
        await narrowed.request({"type": "ping"}, "pong")
        await stalled.send(json.dumps({"type": "ping"}))  # processed; the reply waits unread

        # Warm up every code path first so that what RSS measures is queues.
        await publish_bulk(redis_server.url, rid, warmup, history)
        for client in (narrowed, firehose):
            await eventually(lambda c=client: len(c.events(rid)) >= warmup, 20, "warm-up")
        rss_before = gateway_rss(gw)

        started = time.monotonic()
        await publish_bulk(redis_server.url, rid, flood, history)
        published = time.monotonic()
        for client in (narrowed, firehose):
            await eventually(lambda c=client: total in event_seqs(c.frames, rid), 30, "readers")
        # The readers are not held back by the stalled client: they finish
        # shortly after the publisher, not after some timeout of the stalled one.
        lag = time.monotonic() - published
        assert lag < 5, f"readers finished {lag:.1f}s after the last publish"
        for client in (narrowed, firehose):
            # A burst this size outruns even a reading client's 64-event queue
            # now and then; it may be told "lagged", but never misses an event.
            assert event_seqs(client.frames, rid) == list(range(1, total + 1))

        rss_growth = gateway_rss(gw) - rss_before
        # 20,000 frames of 1 KB held for the stalled client would be over 20 MB.
        assert rss_growth < 12 * 1024 * 1024, f"gateway RSS grew {rss_growth / 2**20:.1f} MiB"
        assert metric(gw, "relay_queue_drops_total") > 0
        assert time.monotonic() - started < 60

        # Resumed, the stalled client catches up with a continuous sequence:
        # "lagged" says events were skipped, history fills them in.
        frames = await read_until(stalled, {rid: total}, timeout=30)
        assert event_seqs(frames, rid) == list(range(1, total + 1))
        lagged = [f for f in frames if f.get("type") == "lagged"]
        assert lagged and all(f["request_id"] == rid and f["skipped"] > 0 for f in lagged)
        assert not [f for f in frames if f.get("type") == "resync_required"]
        assert metric(gw, "relay_events_replayed_total") > 0


async def test_stalled_firehose_client_gets_the_tail_of_a_finished_request(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """Dropped events of a request that publishes nothing afterwards are still
    refilled: the last events of a finished request must not vanish."""
    gw = start_gateway({"RELAY_GATEWAY_SEND_QUEUE_MAX": "32", "RELAY_GATEWAY_PING_INTERVAL": "120"})
    history = HistoryConfig(max_events=50_000)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with stalled_client(gw.ws_url) as stalled, WsClient(gw.ws_url) as reader:
        await reader.request({"type": "ping"}, "pong")
        await stalled.send(json.dumps({"type": "ping"}))
        await publish_bulk(redis_server.url, first, 3000, history)
        # A few events of another request push the first one's tail out of
        # the stalled client's queue.
        await publish_bulk(redis_server.url, second, 100, history)
        await eventually(lambda: len(reader.events(second)) >= 100, 20, "the reader")
        await eventually(lambda: metric(gw, "relay_queue_drops_total") > 0, 10, "drops")

        frames = await read_until(stalled, {first: 3000, second: 100}, timeout=30)
        assert event_seqs(frames, first) == list(range(1, 3001))
        assert event_seqs(frames, second) == list(range(1, 101))


async def test_overflow_policy_close_closes_with_1013(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway(
        {
            "RELAY_GATEWAY_SEND_QUEUE_MAX": "64",
            "RELAY_GATEWAY_OVERFLOW_POLICY": "close",
            "RELAY_GATEWAY_PING_INTERVAL": "120",
            # The process's cache of recent events is bounded on its own
            # (tests/unit/test_shedding.py); kept small so RSS shows the queue.
            "RELAY_GATEWAY_RECENT_EVENTS_PER_REQUEST": "64",
        }
    )
    history = HistoryConfig(max_events=50_000)
    rid = str(uuid.uuid4())
    # More than the kernel buffers between the two (up to 4 MiB of send buffer
    # on loopback) hold, so that the gateway's writes really block.
    total = 10_000
    async with (
        WsClient(f"{gw.ws_url}?request_id={rid}") as reader,
        stalled_client(f"{gw.ws_url}?request_id={rid}") as stalled,
    ):
        await reader.request({"type": "ping"}, "pong")
        await eventually(lambda: metric(gw, "relay_connections") == 2, 10, "two connections")
        rss_before = gateway_rss(gw)
        # Paced (about 5,000 events/s) so the reading client never fills its queue.
        async with RelayClient.from_url(redis_server.url, history=history) as pub:
            agent = str(uuid.uuid4())
            for _ in range(0, total, 20):
                await pub.publish_text_deltas(rid, agent, [payload() for _ in range(20)])
                await asyncio.sleep(0.004)
        await eventually(lambda: total in event_seqs(reader.frames, rid), 20, "the reader")
        assert event_seqs(reader.frames, rid) == list(range(1, total + 1))
        assert not reader.closed.is_set() and not reader.of_type("lagged")
        # Once over its limit the stalled connection takes no more events,
        # though its writer is blocked in a send (10,000 frames would be 11 MB).
        rss_growth = gateway_rss(gw) - rss_before
        assert rss_growth < 6 * 1024 * 1024, f"gateway RSS grew {rss_growth / 2**20:.1f} MiB"

        # Resumed, the stalled client reads what was already on its way, then
        # the close: 1013, try again later (and resume with after_seq).
        frames: list[dict[str, Any]] = []
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(30):
                async for message in stalled:
                    frames.append(json.loads(message))
        assert stalled.close_code == 1013, stalled.close_code
        got = event_seqs(frames, rid)
        assert got == list(range(1, len(got) + 1))
        assert len(got) < total
        await eventually(lambda: metric(gw, "relay_connections") == 1, 10, "stalled one released")


async def test_stalled_firehose_client_that_subscribes_gets_an_exact_stream(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    """A firehose client narrows itself with ``after_seq`` while events of that
    request are still queued for it: after the ``subscribed`` reply it gets
    exactly ``after_seq + 1 ..``, in order, whatever was queued before."""
    gw = start_gateway({"RELAY_GATEWAY_SEND_QUEUE_MAX": "64", "RELAY_GATEWAY_PING_INTERVAL": "120"})
    history = HistoryConfig(max_events=50_000)
    rid = str(uuid.uuid4())
    async with stalled_client(gw.ws_url) as stalled:
        await stalled.send(json.dumps({"type": "ping"}))
        await publish_bulk(redis_server.url, rid, 6000, history)
        await eventually(lambda: metric(gw, "relay_queue_drops_total") > 0, 10, "drops")
        await stalled.send(json.dumps({"type": "subscribe", "request_id": rid, "after_seq": 0}))
        # Commands are read while the client reads nothing; wait until it ran.
        await eventually(lambda: metric(gw, "relay_commands_total") >= 2, 10, "the subscribe")
        await publish_bulk(redis_server.url, rid, 10, history)
        frames = await read_until(stalled, {rid: 6010}, timeout=30)
        cut = next(i for i, f in enumerate(frames) if f.get("type") == "subscribed")
        assert event_seqs(frames[cut:], rid) == list(range(1, 6011))
        assert event_seqs(frames[:cut], rid) == sorted(set(event_seqs(frames[:cut], rid)))
