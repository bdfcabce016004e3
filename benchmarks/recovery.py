"""Recovery benchmark: Redis restart, resume throughput, and a stalled client's memory.

Starts its own redis-server (append-only file on, so a restart keeps the
streams) on a free port and one gateway process, then measures:

* time to recover from a Redis restart: from the moment the restarted server
  answers until a connected client receives the next event published to it;
* resume throughput: events/s replayed to a client that subscribes with
  ``after_seq=0`` to a request with a 10,000-event history;
* the memory a stalled client costs the gateway: gateway RSS before and after
  20,000 events of about 1 KB reach a client that reads nothing.

Run: ``python benchmarks/recovery.py`` (needs ``redis-server`` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.config import HistoryConfig
from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer


def delta(text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


async def recv_event(ws: Any, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if "seq" in frame and "ts" in frame:
                return frame


async def restart_recovery(
    redis: RedisServer, gw: Gateway, rounds: int
) -> tuple[list[float], list[float]]:
    """Seconds from "restarted server answers" (and from "restart begins") to
    "client has the next event"."""
    rid = str(uuid.uuid4())
    results: list[float] = []
    totals: list[float] = []
    async with (
        websockets.connect(f"{gw.ws_url}?request_id={rid}") as ws,
        RelayClient.from_url(redis.url, publish_retry_seconds=30) as pub,
    ):
        await pub.publish(rid, delta("warm"))
        await recv_event(ws, 10)
        for _ in range(rounds):
            began = time.monotonic()
            await asyncio.to_thread(redis.restart)
            back = time.monotonic()
            await pub.publish(rid, delta("after restart"))
            await recv_event(ws, 30)
            results.append(time.monotonic() - back)
            totals.append(time.monotonic() - began)
    return results, totals


async def resume_throughput(redis: RedisServer, gw: Gateway, events: int) -> float:
    """Events/s replayed from history to a client subscribing with after_seq=0."""
    rid = str(uuid.uuid4())
    history = HistoryConfig(max_events=events * 2)
    async with RelayClient.from_url(redis.url, history=history) as pub:
        for start in range(0, events, 200):
            await pub.publish_many(rid, [delta(f"e{i}") for i in range(start, start + 200)])
    async with websockets.connect(f"{gw.ws_url}?request_id={rid}&after_seq=0") as ws:
        started = time.monotonic()
        seen = 0
        while seen < events:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if "seq" in frame and "ts" in frame:
                seen += 1
        return events / (time.monotonic() - started)


async def stalled_memory(redis: RedisServer, gw: Gateway, events: int) -> tuple[float, float]:
    """Gateway RSS (MiB) before and after ``events`` 1 KB events reach a stalled client."""
    assert gw.proc is not None
    proc = psutil.Process(gw.proc.pid)
    rid = str(uuid.uuid4())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    history = HistoryConfig(max_events=events * 2)
    async with (
        websockets.connect(
            f"{gw.ws_url}?request_id={rid}", sock=sock, max_queue=16, compression=None
        ),
        RelayClient.from_url(redis.url, history=history) as pub,
    ):
        agent = str(uuid.uuid4())
        await pub.publish_text_deltas(rid, agent, ["warm"] * 100)
        await asyncio.sleep(0.5)
        before = proc.memory_info().rss / 2**20
        for _ in range(0, events, 100):
            texts = [base64.b64encode(os.urandom(750)).decode() for _ in range(100)]
            await pub.publish_text_deltas(rid, agent, texts)
        await asyncio.sleep(1.0)
        after = proc.memory_info().rss / 2**20
    return before, after


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=True).start()
        gw = Gateway(
            redis.url,
            Path(tmp) / "gateway.log",
            {"RELAY_GATEWAY_SEND_QUEUE_MAX": str(args.queue), "RELAY_LOG_LEVEL": "warning"},
        ).start()
        try:
            times, totals = await restart_recovery(redis, gw, args.restarts)
            print(
                f"redis restart, server answering again -> next event delivered: median "
                f"{statistics.median(times):.3f}s  max {max(times):.3f}s; from the start of "
                f"the restart (stop, AOF reload): median {statistics.median(totals):.3f}s "
                f"({len(times)} restarts)"
            )
            rate = await resume_throughput(redis, gw, args.history)
            print(f"resume (after_seq=0, {args.history} events): {rate:,.0f} events/s")
            before, after = await stalled_memory(redis, gw, args.stalled_events)
            print(
                f"stalled client, {args.stalled_events} x 1 KB events, send_queue_max="
                f"{args.queue}: gateway RSS {before:.1f} -> {after:.1f} MiB "
                f"({after - before:+.1f} MiB)"
            )
        finally:
            gw.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--stalled-events", type=int, default=20_000)
    parser.add_argument("--queue", type=int, default=1024, help="gateway.send_queue_max")
    asyncio.run(main(parser.parse_args()))
