"""Cost of the publish script: events/s through the SDK and server time per event.

Starts its own redis-server (no persistence) on a free port and publishes
``agent_text_delta`` events (the hot path: many small events, no state
update) and a mix with stateful events (spawns, budget updates, completions)
through :class:`relay.client.RelayClient`:

* ``unbatched``: one ``publish`` per event, one at a time (round-trip bound);
* ``concurrent``: one ``publish`` per event, ``--concurrency`` calls in flight
  (Redis-bound: this is where the script's own cost shows);
* ``batched``: ``publish_many`` with ``--batch`` events per call.

For each it prints events/s seen by the client and the server's own time per
event (``INFO commandstats`` of EVALSHA divided by the events per call), which
isolates the script from Python and network noise. ``--script FILE`` runs the
same measurements with another version of ``publish.lua`` (for example the one
on main: ``git show main:relay/lua/publish.lua > /tmp/old.lua``), so two
versions can be compared on the same machine in one sitting.

Run: ``python benchmarks/publish_script.py [--events 20000] [--batch 100] [--script FILE]``.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from relay.client import RelayClient
from relay.scripts import LuaScript
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


async def run_phase(
    client: RelayClient, name: str, events: int, batch: int, concurrency: int, kind: str
) -> None:
    rid = str(uuid.uuid4())
    make = text_deltas(str(uuid.uuid4())) if kind == "deltas" else stateful_mix(rid)
    per_call = batch if name == "batched" else 1
    calls = events // per_call
    await client.redis.config_resetstat()
    started = time.perf_counter()
    if name == "concurrent":
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
    sent = calls * per_call
    print(
        f"{kind:7} {name:10} {sent / elapsed:10,.0f} events/s   "
        f"server {usec / max(1, n_calls * per_call):6.2f} us/event   "
        f"({n_calls} calls of {per_call})"
    )


def override_script(client: RelayClient, path: Path) -> None:
    """Make ``client`` publish with the script in ``path`` instead of the package's."""
    replacement = LuaScript("publish")
    replacement.source = path.read_text("utf-8")
    replacement.sha = hashlib.sha1(replacement.source.encode()).hexdigest()
    client._script = replacement


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            async with RelayClient.from_url(server.url) as client:
                if args.script:
                    override_script(client, Path(args.script))
                print(f"script: {args.script or 'relay/lua/publish.lua'}")
                for kind in ("deltas", "mixed"):
                    for name in ("unbatched", "concurrent", "batched"):
                        await run_phase(
                            client, name, args.events, args.batch, args.concurrency, kind
                        )
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per phase")
    parser.add_argument("--batch", type=int, default=100, help="events per publish_many call")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--script", help="publish.lua to measure instead of the package's")
    asyncio.run(main(parser.parse_args()))
