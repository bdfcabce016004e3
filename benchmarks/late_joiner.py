"""A late joiner of a long request: time and bytes from connect to a fully rendered view.

Starts its own redis-server and ``relay gateway`` processes on free ports,
publishes one request with ``--agents`` agents (a root and its sub-agents)
that streamed ``--deltas`` text deltas each, then joins it with a new
WebSocket client, over and over, in three ways:

* ``snapshot`` (``text_max_bytes`` 65536): ``?request_id=R&snapshot=1``; the
  view is rendered from the one ``snapshot`` frame (each agent's whole text,
  as long as it is within 64 KiB);
* ``snapshot16k`` (the default ``text_max_bytes``, 16384): the same, each
  text cut to its latest 16 KiB (the console shows the latest 2,048
  characters anyway);
* ``replay``: ``?request_id=R&after_seq=0``, as a client without the compact
  snapshot must: every event from history, each delta applied in turn.

"Rendered" means every agent's text is known: from the snapshot, or once the
replay reached the last seq. Bytes are the WebSocket message payloads
received. The rendered texts of ``snapshot`` and ``replay`` are checked to be
equal. The gateways run with history and replay limits raised, so that the
replay can reach back to seq 1 at all (with the defaults, 10,000 events of
history and 64 MiB of replay per minute, it could not).

Run: ``python benchmarks/late_joiner.py [--agents 20] [--deltas 2000] [--rounds 5]``.
Prints numbers; asserts nothing but the equality of the rendered texts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import websockets

from relay.config import HistoryConfig
from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer

HISTORY = 1_000_000


async def publish_request(url: str, rid: str, agents: int, deltas: int) -> int:
    """Publish the request; returns its last seq."""
    ids = [str(uuid.uuid4()) for _ in range(agents)]
    history = HistoryConfig(max_events=HISTORY)
    async with RelayClient.from_url(url, history=history) as pub:
        spawns = [{"type": "agent_spawned", "agent_id": a, "parent_id": None if i == 0 else ids[0],
                   "task_description": f"agent {i}", "depth": 0 if i == 0 else 1,
                   "index": max(0, i - 1), "total": max(1, agents - 1)}
                  for i, a in enumerate(ids)]  # fmt: skip
        await pub.publish_many(rid, spawns)
        batch: list[dict[str, Any]] = []
        last = 0
        for step in range(deltas):
            for agent in ids:
                text = f"token{step} "  # about one token, as a model streams them
                batch.append({"type": "agent_text_delta", "agent_id": agent, "text": text})
            if len(batch) >= 200:
                last = (await pub.publish_many(rid, batch)).last_seq
                batch = []
        if batch:
            last = (await pub.publish_many(rid, batch)).last_seq
        return last


async def join(url: str, last_seq: int, snapshot: bool) -> tuple[float, int, int, dict[str, str]]:
    """Seconds, bytes and frames from connect to every text rendered, and the texts."""
    texts: dict[str, str] = {}
    received = frames = 0
    started = time.perf_counter()
    async with websockets.connect(url, max_size=None) as ws:
        async for message in ws:
            received += len(message)
            frames += 1
            frame = json.loads(message)
            kind = frame.get("type")
            if snapshot and kind == "snapshot":
                texts = {a: t["text"] for a, t in frame["texts"].items()}
                break
            if kind == "agent_text_delta":
                texts[frame["agent_id"]] = texts.get(frame["agent_id"], "") + frame["text"]
            if not snapshot and frame.get("seq") == last_seq and "ts" in frame:
                break
            if kind in ("resync_required", "error"):
                raise RuntimeError(f"the join failed: {frame}")
    return time.perf_counter() - started, received, frames, texts


async def main(args: argparse.Namespace) -> None:
    env = {"RELAY_HISTORY_MAX_EVENTS": str(HISTORY),
           "RELAY_LIMITS_REPLAY_BYTES_PER_MINUTE": str(1 << 40)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis").start()
        full = Gateway(server.url, work / "gw-64k.log",
                       {**env, "RELAY_SNAPSHOT_TEXT_MAX_BYTES": "65536"})  # fmt: skip
        default = Gateway(server.url, work / "gw-16k.log", env)
        try:
            full.start()
            default.start()
            rid = str(uuid.uuid4())
            began = time.perf_counter()
            last = await publish_request(server.url, rid, args.agents, args.deltas)
            print(f"published {last:,} events ({args.agents} agents x {args.deltas:,} deltas) "
                  f"in {time.perf_counter() - began:.1f}s")  # fmt: skip
            ways = {
                "snapshot": (f"{full.ws_url}?request_id={rid}&snapshot=1", True),
                "snapshot16k": (f"{default.ws_url}?request_id={rid}&snapshot=1", True),
                "replay": (f"{full.ws_url}?request_id={rid}&after_seq=0", False),
            }
            results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in ways}
            rendered: dict[str, dict[str, str]] = {}
            for round_ in range(args.rounds):
                order = list(ways.items())
                if round_ % 2:
                    order.reverse()  # machine drift hits every way alike
                for name, (url, snap) in order:
                    seconds, size, frames, texts = await join(url, last, snap)
                    results[name].append((seconds, size, frames))
                    rendered[name] = texts
        finally:
            full.stop()
            default.stop()
            server.stop()
    if rendered["snapshot"] != rendered["replay"]:
        raise SystemExit("the snapshot rendered other texts than the replay")
    cut = all(rendered["replay"][a].endswith(t) for a, t in rendered["snapshot16k"].items())
    if not cut:
        raise SystemExit("the 16 KiB snapshot is not the end of each text")
    print(f"{'join':12} {'frames':>8} {'time to rendered (median)':>27} {'bytes':>14}")
    for name, runs in results.items():
        seconds = statistics.median(s for s, _, _ in runs)
        median_bytes = statistics.median(float(b) for _, b, _ in runs)
        count = statistics.median(float(f) for _, _, f in runs)
        print(f"{name:12} {count:>8,.0f} {seconds * 1000:>24.1f} ms {median_bytes:>14,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20, help="agents in the request")
    parser.add_argument("--deltas", type=int, default=2000, help="text deltas per agent")
    parser.add_argument("--rounds", type=int, default=5, help="joins per way (medians)")
    asyncio.run(main(parser.parse_args()))
