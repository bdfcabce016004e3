"""Throughput on one Redis node against a three-master Redis Cluster (sharded pub/sub).

For each topology it starts its own Redis (one ``redis-server``, or three
cluster-enabled ones joined by ``redis-cli --cluster create``, no
persistence), one ``relay gateway`` process, and WebSocket clients in a
separate process: ``--clients`` clients each on one of ``--requests``
requests (spread over every master), plus one tenant-wide client. Publishers
(SDK, ``publish_many`` batches) push ``--events`` events round-robin over the
requests as fast as they can. It prints:

* events/s through the SDK (the publishers' wall time);
* deliveries/s: every client's events over the span from the first receipt
  to the last;
* per Redis node: publish commands run, and what the cluster bus carried
  (``cluster_stats_messages_publish*_sent``), which is where classic PUBLISH
  costs every node every message.

``--broadcast`` adds a run on the cluster with the plain publish script
(classic PUBLISH, the firehose on one channel), with no clients (gateways
subscribe shard channels, so it delivers nothing to them): the price of
broadcast pub/sub, as cluster-bus traffic per node.

Run: ``python benchmarks/cluster_throughput.py [--events 20000] [--broadcast]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.config import RedisConfig
from relay.orchestrator.client import RelayClient, encode_event
from relay.wire.keys import Keys, key_slot
from relay.wire.scripts import script
from tests.integration.topology_support import RedisClusterProcs, cli
from tests.support import Gateway, RedisServer


def run_clients(urls: list[tuple[str, int]], pipe: Connection) -> None:
    """Child process: one client per (url, events expected); reports (first, last, delivered)."""

    async def one(url: str, expect: int, marks: list[float], got: list[int]) -> None:
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            while json.loads(await ws.recv()).get("type") != "pong":
                pass
            pipe.send("one ready")
            seen = 0
            while seen < expect:
                frame = json.loads(await ws.recv())
                if "ts" in frame and "seq" in frame:
                    seen += 1
                    if seen == 1:
                        marks.append(time.time())
            marks.append(time.time())
            got.append(seen)

    async def main() -> None:
        marks: list[float] = []
        got: list[int] = []
        await asyncio.gather(*(one(u, n, marks, got) for u, n in urls))
        pipe.send((min(marks), max(marks), sum(got)))

    asyncio.run(main())


def plan(rids: list[str], args: argparse.Namespace) -> list[list[tuple[str, int]]]:
    """Per publisher, its (request, batch size) calls: round-robin over the requests."""
    per = args.events // args.publishers
    calls: list[list[tuple[str, int]]] = []
    for p in range(args.publishers):
        sizes = [min(args.batch, per - s) for s in range(0, per, args.batch)]
        calls.append([(rids[(p + i) % len(rids)], n) for i, n in enumerate(sizes)])
    return calls


async def flood(rc: RedisConfig, calls: list[list[tuple[str, int]]], *, plain: bool) -> float:
    """Run every publisher's calls as fast as it can; returns the wall time."""

    async def publisher(mine: list[tuple[str, int]]) -> None:
        async with RelayClient.from_config(rc) as pub:
            event = {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": "x" * 100}
            for rid, n in mine:
                if plain:
                    await publish_plain(pub, rid, [event] * n)
                else:
                    await pub.publish_many(rid, [event] * n)

    started = time.monotonic()
    await asyncio.gather(*(publisher(mine) for mine in calls))
    return time.monotonic() - started


async def publish_plain(pub: RelayClient, rid: str, events: list[dict[str, Any]]) -> None:
    """The standalone script on a cluster: PUBLISH (broadcast) to the request channel
    and the one tenant-wide channel."""
    encoded: list[str] = []
    for event in events:
        encoded.extend(encode_event(rid, event))
    rk, history = Keys().request(rid), pub.history
    args = [rid, uuid.uuid4().hex[:12], history.max_events, history.ttl_seconds,
            history.state_ttl_seconds, rk.channel, Keys().firehose_channel,
            uuid.uuid4().hex, "0", *encoded]  # fmt: skip
    await script("publish")(pub.redis, rk.script_keys, args)


def node_stats(ports: list[int], clustered: bool) -> dict[int, dict[str, int]]:
    """Per node: publish commands run, and publish messages its cluster bus sent."""
    stats: dict[int, dict[str, int]] = {}
    for port in ports:
        row: dict[str, int] = {}
        for line in cli(port, "INFO", "commandstats").splitlines():
            for name in ("publish", "spublish", "evalsha"):
                if line.startswith(f"cmdstat_{name}:"):
                    row[name] = int(line.split("calls=")[1].split(",")[0])
        if clustered:
            for line in cli(port, "CLUSTER", "INFO").splitlines():
                key, _, value = line.strip().partition(":")
                if key.startswith("cluster_stats_messages_publish") and key.endswith("_sent"):
                    row["bus_" + key.removeprefix("cluster_stats_messages_")] = int(value)
        stats[port] = row
    return stats


def rids_over(slot_ports: list[int] | None, count: int) -> list[str]:
    """``count`` request ids; on a cluster, as many on each master (round-robin order)."""
    if slot_ports is None:
        return [str(uuid.uuid4()) for _ in range(count)]
    masters = sorted(set(slot_ports))
    found: dict[int, list[str]] = {m: [] for m in masters}
    while any(len(v) < count // len(masters) for v in found.values()):
        rid = str(uuid.uuid4())
        mine = found[slot_ports[key_slot(rid)]]
        if len(mine) < count // len(masters):
            mine.append(rid)
    return [rid for group in zip(*found.values(), strict=True) for rid in group]


def start_clients(urls: list[tuple[str, int]]) -> tuple[mp.process.BaseProcess, Connection]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=run_clients, args=(urls, child), daemon=True)
    proc.start()
    for _ in urls:
        if not parent.poll(60) or parent.recv() != "one ready":
            raise RuntimeError("clients did not connect")
    return proc, parent


async def run(name: str, folder: Path, args: argparse.Namespace, *, broadcast: bool) -> None:
    clustered = name != "one node"
    slot_ports: list[int] | None = None
    if clustered:
        cluster = RedisClusterProcs(folder).start()
        url, ports, stop = cluster.url, [n.port for n in cluster.nodes], cluster.stop
        rc, env = RedisConfig(mode="cluster", url=url), {"RELAY_REDIS_MODE": "cluster"}
        slot_ports = cluster.slot_ports()
    else:
        server = RedisServer(folder).start()
        url, ports, stop = server.url, [server.port], server.stop
        rc, env = RedisConfig(url=url), {}
    gw = Gateway(url, folder / "gateway.log", {"RELAY_LOG_LEVEL": "warning", **env}).start()
    try:
        rids = rids_over(slot_ports, args.requests)
        calls = plan(rids, args)
        counts = dict.fromkeys(rids, 0)
        for mine in calls:
            for rid, n in mine:
                counts[rid] += n
        published = sum(counts.values())
        before = node_stats(ports, clustered)
        proc = parent = None
        if not broadcast:
            urls = [
                (f"{gw.ws_url}?request_id={rids[i % len(rids)]}", counts[rids[i % len(rids)]])
                for i in range(args.clients)
            ]
            proc, parent = start_clients([*urls, (gw.ws_url, published)])
        publish_s = await flood(rc, calls, plain=broadcast)
        line = f"{name}: {published:,} events published in {publish_s:.2f}s"
        line += f" ({published / publish_s:,.0f}/s)"
        if proc is not None and parent is not None:
            first, last, delivered = await asyncio.to_thread(parent.recv)
            proc.join(10)
            line += f"; {delivered:,} deliveries in {last - first:.2f}s"
            line += f" ({delivered / (last - first):,.0f}/s)"
        print(line, flush=True)
        after = node_stats(ports, clustered)
        for port in ports:
            diff = {k: v - before[port].get(k, 0) for k, v in after[port].items()}
            print(f"  node {port}: " + ", ".join(f"{k} {v:,}" for k, v in diff.items() if v))
    finally:
        gw.stop()
        stop()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.logs) if args.logs else Path(tmp)
        await run("one node", base / "one", args, broadcast=False)
        await run("three shards", base / "three", args, broadcast=False)
        if args.broadcast:
            await run("three shards, classic PUBLISH", base / "plain", args, broadcast=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--clients", type=int, default=12, help="one request each, round-robin")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=50, help="events per publish_many")
    parser.add_argument("--broadcast", action="store_true", help="also the plain script")
    parser.add_argument("--logs", help="keep the servers' directories and logs here")
    asyncio.run(main(parser.parse_args()))
