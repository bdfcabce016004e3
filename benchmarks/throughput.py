"""Throughput and latency of one gateway process.

Starts its own redis-server (no persistence) on a free port and one
``relay gateway`` process, connects N WebSocket clients (in a separate
process, so that client-side parsing does not slow the publisher) to one
request, and measures:

* throughput: events/s through the gateway when publishers push as fast as
  they can (each event is delivered to every client: deliveries = events x N);
* latency at a fixed publish rate (default 1,000 events/s): p50/p99/max from
  the publisher's call to the client's receipt (wall clock, same machine).

Run: ``python benchmarks/throughput.py [--clients 10] [--events 20000] [--rate 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer


def run_clients(url: str, clients: int, expect: int, pipe: Connection) -> None:
    """Child process: N clients; report (first and last receipt, latencies, delivered, shed)."""
    delivered: list[int] = []
    shed: collections.Counter[str] = collections.Counter()

    async def one(
        ws: Any, latencies: list[float], marks: list[float], ready: asyncio.Event
    ) -> None:
        # Run until the last seq arrives. A client that falls further behind
        # than history reaches is shed by policy (lagged, then resync_required):
        # those frames are counted, not awaited, so the figures say what was
        # delivered rather than hang.
        seen = 0
        while True:
            frame = json.loads(await ws.recv())
            kind = frame.get("type")
            if kind == "pong":
                ready.set()
                continue
            if kind in ("lagged", "resync_required"):
                shed[kind] += 1
                continue
            if "ts" not in frame:
                continue
            now = time.time()
            seen += 1
            if seen == 1:
                marks.append(now)
            text = frame.get("text", "")
            if text and text[0].isdigit():
                latencies.append(now - float(text))
            if frame["seq"] >= expect:
                break
        delivered.append(seen)
        marks.append(time.time())

    async def main() -> None:
        sockets = [await websockets.connect(url, max_size=None) for _ in range(clients)]
        latencies: list[float] = []
        marks: list[float] = []
        delivered.clear()
        shed.clear()
        readies = [asyncio.Event() for _ in sockets]
        tasks = [
            asyncio.create_task(one(ws, latencies, marks, ev))
            for ws, ev in zip(sockets, readies, strict=True)
        ]
        for ws in sockets:
            await ws.send(json.dumps({"type": "ping"}))
        for ev in readies:
            await ev.wait()
        pipe.send("ready")
        await asyncio.gather(*tasks)
        for ws in sockets:
            await ws.close()
        pipe.send((min(marks), max(marks), latencies, sum(delivered), dict(shed)))

    asyncio.run(main())


def start_clients(url: str, clients: int, expect: int) -> tuple[mp.process.BaseProcess, Connection]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=run_clients, args=(url, clients, expect, child), daemon=True
    )
    proc.start()
    if not parent.poll(30) or parent.recv() != "ready":
        raise RuntimeError("clients did not connect")
    return proc, parent


def delta(agent: str, text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": agent, "text": text}


async def flood(url: str, rid: str, events: int, publishers: int, batch: int) -> float:
    """Publish ``events`` as fast as possible; returns the publishing wall time."""
    agent = str(uuid.uuid4())
    per = events // publishers

    async def publisher() -> None:
        async with RelayClient.from_url(url) as pub:
            for start in range(0, per, batch):
                n = min(batch, per - start)
                await pub.publish_many(rid, [delta(agent, "x" * 100)] * n)

    started = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(publishers)))
    return time.monotonic() - started


async def paced(url: str, rid: str, events: int, rate: float) -> None:
    agent = str(uuid.uuid4())
    loop = asyncio.get_running_loop()
    async with RelayClient.from_url(url) as pub:
        start = loop.time()
        for i in range(events):
            ahead = start + i / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await pub.publish(rid, delta(agent, f"{time.time():.6f}"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        gw = Gateway(redis.url, Path(tmp) / "gateway.log", {"RELAY_LOG_LEVEL": "warning"}).start()
        try:
            print(f"{args.clients} clients on one gateway, one request")
            rid = str(uuid.uuid4())
            url = f"{gw.ws_url}?request_id={rid}"
            proc, pipe = start_clients(url, args.clients, args.events)
            publish_s = await flood(redis.url, rid, args.events, args.publishers, args.batch)
            first, last, _, delivered, shed = await asyncio.to_thread(pipe.recv)
            proc.join(10)
            span = last - first
            print(
                f"throughput: {args.events:,} events published in {publish_s:.2f}s "
                f"({args.events / publish_s:,.0f}/s); clients done in {span:.2f}s: "
                f"{delivered:,} deliveries ({delivered / span:,.0f}/s), "
                f"{args.events * args.clients - delivered:,} shed by policy {shed or ''}"
            )

            rid = str(uuid.uuid4())
            count = int(args.rate * args.seconds)
            proc, pipe = start_clients(f"{gw.ws_url}?request_id={rid}", args.clients, count)
            await paced(redis.url, rid, count, args.rate)
            _, _, latencies, _, shed = await asyncio.to_thread(pipe.recv)
            proc.join(10)
            ms = [v * 1000 for v in latencies]
            print(
                f"latency at {args.rate:,.0f} events/s x {args.clients} clients "
                f"({len(ms):,} receipts): p50 {statistics.median(ms):.2f} ms  "
                f"p99 {pct(ms, 0.99):.2f} ms  max {max(ms):.2f} ms; shed {shed or 'none'}"
            )
        finally:
            gw.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=50, help="events per publish_many")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
