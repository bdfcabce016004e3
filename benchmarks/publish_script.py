"""Cost of the publish script: events/s through the SDK and server time per event.

Starts its own redis-server (no persistence) on a free port and publishes
``agent_text_delta`` events (the hot path: many small events, no state
update) and a mix with stateful events (spawns, budget updates, completions)
through :class:`relay.orchestrator.client.RelayClient`:

* ``unbatched``: one ``publish`` per event, one at a time (round-trip bound);
* ``concurrent``: one ``publish`` per event, ``--concurrency`` calls in flight
  (Redis-bound: this is where the script's own cost shows);
* ``batched``: ``publish_many`` with ``--batch`` events per call;
* ``pipelined``: one event per script call, 500 calls per round trip, events
  validated and encoded beforehand (not the SDK's publish path: Redis-bound,
  the least noisy view of the script's own cost).

For each it prints events/s seen by the client and the server's own time per
event (``INFO commandstats`` of EVALSHA divided by the events per call), which
isolates the script from Python and network noise. ``--compare FILE`` measures
another version of ``publish.lua`` alongside (for example an older one:
``git show <commit>:relay/wire/lua/publish.lua > old.lua``), phase by phase in
alternating order, so that both see the same machine load.

Run: ``python benchmarks/publish_script.py [--events 10000] [--rounds 3] [--compare FILE]``.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from relay.orchestrator.client import RelayClient, encode_event
from relay.wire.scripts import LuaScript
from tests.support import RedisServer

Event = dict[str, Any]


def text_deltas(agent: str) -> Callable[[int], Event]:
    def make(i: int) -> Event:
        return {"type": "agent_text_delta", "agent_id": agent, "text": f"token {i} of the answer "}

    return make


def stateful_mix(rid: str) -> Callable[[int], Event]:
    """One in four events updates the snapshot state (spawn, budget, completion)."""
    agents = [str(uuid.uuid4()) for _ in range(64)]

    def make(i: int) -> Event:
        agent = agents[(i // 4) % len(agents)]
        match i % 8:
            case 0:
                return {"type": "agent_spawned", "agent_id": agent, "parent_id": None,
                        "task_description": "t", "depth": 0, "index": 0, "total": 1}  # fmt: skip
            case 4:
                return {"type": "budget_update", "request_id": rid, "tokens_used": i,
                        "budget_total": 10**6, "percentage": i / 10**4}  # fmt: skip
            case _:
                return text_deltas(agent)(i)

    return make


async def server_usec(redis: Redis) -> tuple[int, float]:
    """(calls, total usec) of EVALSHA since the last CONFIG RESETSTAT."""
    stats = await redis.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(entry["calls"]), float(entry["usec"])


PHASES = [
    (kind, name)
    for kind in ("deltas", "mixed")
    for name in ("unbatched", "concurrent", "batched", "pipelined")
]
PIPELINE = 500
"""Script calls per round trip in the ``pipelined`` phase."""


async def pipelined(
    client: RelayClient, rid: str, encoded: list[tuple[str, str]], calls: int
) -> None:
    """One event per EVALSHA, ``PIPELINE`` calls per round trip, events encoded beforehand:
    Redis does nearly all the work, so this shows the script's own cost best."""
    rk = client.keys.request(rid)
    for start in range(0, calls, PIPELINE):
        pipe = client.redis.pipeline(transaction=False)
        for i in range(start, min(calls, start + PIPELINE)):
            args = [rid, "bench", client.history.max_events, client.history.ttl_seconds,
                    client.history.state_ttl_seconds, rk.channel, client.keys.firehose_channel,
                    uuid.uuid4().hex, "0", *encoded[i]]  # fmt: skip
            client._script.queue(pipe, rk.script_keys, args)
        await pipe.execute()


async def run_phase(
    client: RelayClient, name: str, events: int, batch: int, concurrency: int, kind: str
) -> tuple[float, float]:
    """One phase; returns (events/s seen by the client, server us per event)."""
    rid = str(uuid.uuid4())
    make = text_deltas(str(uuid.uuid4())) if kind == "deltas" else stateful_mix(rid)
    per_call = batch if name == "batched" else 1
    calls = events // per_call
    await client.publish(rid, make(0))  # loads the script: NOSCRIPT stays out of the stats
    encoded = [encode_event(rid, make(i)) for i in range(calls)] if name == "pipelined" else []
    await client.redis.config_resetstat()
    started = time.perf_counter()
    if name == "pipelined":
        await pipelined(client, rid, encoded, calls)
    elif name == "concurrent":
        queue = iter(range(calls))

        async def worker() -> None:
            for i in queue:
                await client.publish(rid, make(i))

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    else:
        for c in range(calls):
            if per_call == 1:
                await client.publish(rid, make(c))
            else:
                await client.publish_many(rid, [make(c * per_call + j) for j in range(per_call)])
    elapsed = time.perf_counter() - started
    n_calls, usec = await server_usec(client.redis)
    return calls * per_call / elapsed, usec / max(1, n_calls * per_call)


def script_from(path: Path) -> LuaScript:
    """The publish script with the source in ``path`` instead of the package's."""
    replacement = LuaScript("publish")
    replacement.source = path.read_text("utf-8")
    replacement.sha = hashlib.sha1(replacement.source.encode()).hexdigest()
    return replacement


async def main(args: argparse.Namespace) -> None:
    versions: dict[str, LuaScript] = {"package": LuaScript("publish")}
    if args.compare:
        versions = {"compare": script_from(Path(args.compare)), **versions}
    results: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            async with RelayClient.from_url(server.url) as client:
                # Rounds interleave the versions phase by phase, so drift in
                # machine load hits both alike; medians are reported.
                for round_ in range(args.rounds):
                    for kind, name in PHASES:
                        if args.phases and name not in args.phases:
                            continue
                        order = list(versions.items())
                        if round_ % 2:
                            order.reverse()
                        for label, lua in order:
                            client._script = lua
                            results.setdefault((label, kind, name), []).append(
                                await run_phase(
                                    client, name, args.events, args.batch, args.concurrency, kind
                                )
                            )
        finally:
            server.stop()
    if args.compare:
        print(f"compare: {args.compare}")
    print(f"package: relay/wire/lua/publish.lua   ({args.rounds} rounds, medians)")
    for kind, name in PHASES:
        if args.phases and name not in args.phases:
            continue
        for label in versions:
            runs = results[(label, kind, name)]
            rate = statistics.median(r for r, _ in runs)
            usec = statistics.median(u for _, u in runs)
            print(
                f"{label:8} {kind:7} {name:10} {rate:10,.0f} events/s   server {usec:6.2f} us/event"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per phase")
    parser.add_argument("--batch", type=int, default=100, help="events per publish_many call")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--compare", help="another publish.lua to measure alongside the package's")
    parser.add_argument(
        "--phases", nargs="*", choices=sorted({n for _, n in PHASES}), help="default: all"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per version (medians)")
    asyncio.run(main(parser.parse_args()))
