"""Throughput and latency of one gateway process.

Starts its own redis-server (no persistence) on a free port and one
``relay gateway`` process, connects N WebSocket clients (in a separate
process, so that client-side parsing does not slow the publisher) to one
request, and measures:

* throughput: events/s through the gateway when publishers push as fast as
  they can (each event is delivered to every client: deliveries = events x N);
* latency at a fixed publish rate (default 1,000 events/s): p50/p99/max from
  the publisher's call to the client's receipt (wall clock, same machine).

Each is measured for WebSocket clients (``/ws/events``) and for SSE clients
(``/sse/events``, read by :class:`tests.sseclient.SseClient`), with the
gateway's CPU time per delivery (user + system, from the process's counters).

Run: ``python benchmarks/throughput.py [--clients 10] [--events 20000] [--rate 1000]
[--transports websocket,sse]``.
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

import psutil
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.orchestrator.client import RelayClient
from tests.sseclient import Message, SseClient
from tests.support import Gateway, RedisServer

SHED = ("lagged", "resync_required")
"""Frames that say events were skipped (the overflow policy at work)."""


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
            if kind in SHED:
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


def run_sse_clients(url: str, clients: int, expect: int, pipe: Connection) -> None:
    """Child process: N SSE clients; report like :func:`run_clients`."""

    async def main() -> None:
        latencies: list[float] = []
        marks: list[float] = []
        subscribed = [asyncio.Event() for _ in range(clients)]
        finished = [asyncio.Event() for _ in range(clients)]
        seen = [0] * clients
        shed: collections.Counter[str] = collections.Counter()

        def handler(i: int) -> Any:
            def on_message(msg: Message) -> None:
                if msg.event == "subscribed":
                    subscribed[i].set()
                    return
                if msg.event in SHED:
                    shed[msg.event] += 1
                    return
                if not msg.data or '"ts":' not in msg.data[0]:
                    return
                # The same work per event as the WebSocket client: one JSON parse.
                frame = json.loads(msg.data[0])
                now = time.time()
                seen[i] += 1
                if seen[i] == 1:
                    marks.append(now)
                text = frame.get("text", "")
                if text and text[0].isdigit():
                    latencies.append(now - float(text))
                if frame["seq"] >= expect:
                    marks.append(now)
                    finished[i].set()

            return on_message

        readers = [
            SseClient(url, keep=False, reconnect=False, on_message=handler(i)).start()
            for i in range(clients)
        ]
        for ev in subscribed:
            await ev.wait()
        pipe.send("ready")
        for ev in finished:
            await ev.wait()
        for reader in readers:
            await reader.stop()
        pipe.send((min(marks), max(marks), latencies, sum(seen), dict(shed)))

    asyncio.run(main())


def start_clients(
    url: str, clients: int, expect: int, transport: str = "websocket"
) -> tuple[mp.process.BaseProcess, Connection]:
    parent, child = mp.Pipe()
    target = run_sse_clients if transport == "sse" else run_clients
    proc = mp.get_context("spawn").Process(
        target=target, args=(url, clients, expect, child), daemon=True
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


def client_url(gw: Gateway, transport: str, rid: str) -> str:
    if transport == "sse":
        return f"{gw.http}/sse/events?request_id={rid}"
    return f"{gw.ws_url}?request_id={rid}"


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def measure(gw: Gateway, redis_url: str, transport: str, args: argparse.Namespace) -> None:
    """The throughput and latency rows of one transport."""
    gateway = psutil.Process(gw.proc.pid if gw.proc is not None else 0)
    rid = str(uuid.uuid4())
    proc, pipe = start_clients(client_url(gw, transport, rid), args.clients, args.events, transport)
    cpu_before = cpu_seconds(gateway)
    publish_s = await flood(redis_url, rid, args.events, args.publishers, args.batch)
    first, last, _, deliveries, shed = await asyncio.to_thread(pipe.recv)
    cpu = cpu_seconds(gateway) - cpu_before
    proc.join(10)
    span = last - first
    print(
        f"{transport:>9} throughput: {args.events:,} events published in {publish_s:.2f}s "
        f"({args.events / publish_s:,.0f}/s); clients done in {span:.2f}s: "
        f"{deliveries:,} deliveries ({deliveries / span:,.0f}/s), "
        f"{args.events * args.clients - deliveries:,} shed by policy {shed or ''}; "
        f"gateway CPU {cpu:.2f}s = {cpu / deliveries * 1e6:.1f} us per delivery"
    )

    rid = str(uuid.uuid4())
    count = int(args.rate * args.seconds)
    proc, pipe = start_clients(client_url(gw, transport, rid), args.clients, count, transport)
    cpu_before = cpu_seconds(gateway)
    await paced(redis_url, rid, count, args.rate)
    _, _, latencies, _, shed = await asyncio.to_thread(pipe.recv)
    cpu = cpu_seconds(gateway) - cpu_before
    proc.join(10)
    ms = [v * 1000 for v in latencies]
    print(
        f"{transport:>9} latency at {args.rate:,.0f} events/s x {args.clients} clients "
        f"({len(ms):,} receipts): p50 {statistics.median(ms):.2f} ms  "
        f"p99 {pct(ms, 0.99):.2f} ms  max {max(ms):.2f} ms; gateway CPU "
        f"{cpu / (count * args.clients) * 1e6:.1f} us per delivery; shed {shed or 'none'}"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        gw = Gateway(redis.url, Path(tmp) / "gateway.log", {"RELAY_LOG_LEVEL": "warning"}).start()
        try:
            print(f"{args.clients} clients on one gateway, one request")
            for transport in args.transports.split(","):
                await measure(gw, redis.url, transport.strip(), args)
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
    parser.add_argument(
        "--transports", default="websocket,sse", help="comma-separated: websocket, sse"
    )
    asyncio.run(main(parser.parse_args()))
