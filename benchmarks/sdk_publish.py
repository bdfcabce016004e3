"""Events/s one orchestrator process publishes through the SDK, batched and unbatched.

Starts its own redis-server (no persistence) on a free port and streams
``agent.text(chunk, tokens=1)`` deltas through ``relay.connect`` /
``rc.request`` / ``req.agent`` in one process:

* ``batched``: the default ``[sdk]`` window (5 ms, 256 events per publish),
  one agent, and ``--agents`` agents streaming side by side;
* ``unbatched``: ``batch_max_events = 1`` (one publish, and one budget add,
  per delta), one agent, and ``--agents`` agents side by side (concurrency:
  several publishes in flight).

For each it prints the deltas per second the agents got through (from the
first delta until every agent's ``agent_completed`` is in Redis), all events
published per second (deltas plus budget updates, spawns, completions) and the
script calls Redis ran (``INFO commandstats``: EVALSHA/EVAL/FCALL), i.e. the
calls batching saved, and the round trips they took (concurrent agents'
calls share round trips: :mod:`relay.orchestrator.autopipe`). Each batch
costs two script calls when its deltas spent tokens (the budget add, then
the publish carrying the ``budget_update``), one without; the last phase
streams deltas that spend no tokens. Targets:
50,000 deltas/s batched, 10,000/s unbatched with concurrency.

Run: ``python benchmarks/sdk_publish.py [--deltas 50000] [--agents 20] [--rounds 2]``.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import relay
from tests.support import RedisServer


def script_calls(redis: RedisServer) -> int:
    total = 0
    for line in redis.command("INFO", "commandstats").decode().splitlines():
        name, _, stats = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"):
            total += int(dict(kv.split("=") for kv in stats.split(","))["calls"])
    return total


async def run(redis: RedisServer, *, deltas: int, agents: int, max_events: int, tokens: int) -> str:
    config = relay.GlobalConfig(
        redis=relay.RedisConfig(url=redis.url),
        sdk=relay.SdkConfig(batch_max_events=max_events),
    )
    per_agent = deltas // agents
    async with relay.connect(config) as rc:
        async with rc.request(budget=2**31) as req:
            redis.command("CONFIG", "RESETSTAT")

            async def stream(i: int) -> None:
                async with req.agent(f"streamer {i}", index=i, total=agents) as agent:
                    for n in range(per_agent):
                        await agent.text(f"token {n} ", tokens=tokens)

            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for i in range(agents):
                    group.create_task(stream(i))
            elapsed = time.perf_counter() - started
        calls = script_calls(redis)
        trips = rc.client.calls.pipelines
        total = per_agent * agents
        return (
            f"{total:>7} deltas {elapsed:6.2f}s {total / elapsed:>9,.0f} deltas/s "
            f"{req.events_published / elapsed:>9,.0f} events/s {calls:>7} script calls "
            f"({total / max(calls, 1):.1f} deltas per call) in {trips:>6} round trips"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deltas", type=int, default=50_000, help="deltas per batched phase")
    parser.add_argument("--unbatched-deltas", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=20, help="agents side by side")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            n, u, k = args.deltas, args.unbatched_deltas, args.agents
            phases = [
                ("batched, 1 agent", n, 1, 256, 1),
                (f"batched, {k} agents", n, k, 256, 1),
                ("unbatched, 1 agent", u // 4, 1, 1, 1),
                (f"unbatched, {k} agents", u, k, 1, 1),
                # Without token accounting: one script call per delta, not two.
                (f"unbatched, {k} agents, 0 tok", u, k, 1, 0),
            ]
            for round_ in range(1, args.rounds + 1):
                for name, deltas, agents, max_events, tokens in phases:
                    line = await run(
                        redis, deltas=deltas, agents=agents, max_events=max_events, tokens=tokens
                    )
                    print(f"round {round_}  {name:<28} {line}", flush=True)
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
