"""An orchestrator process for the lease tests: holds one request and streams into it.

Run as ``python lease_worker.py REQUEST_ID SECONDS [--pause]`` with the
settings in the environment (``RELAY_REDIS_URL``, ``RELAY_LEASE_*``), the way
a deployed orchestrator reads them (``RelayClient.from_config(...,
lease=True)``). It holds the request, spawns a root and two children, and
publishes a text delta per agent every 50 ms for SECONDS, then completes
them and releases the request. With ``--pause`` it first spends 9,000 of a
10,000-token budget and waits in a budget pause.

It reports on stdout, one JSON object a line::

    {"event": "held", "orchestrator": O, "agents": [root, child, child]}
    {"event": "paused"}                                  (--pause) waiting for a decision
    {"event": "decided", "decision": D, "by": B}         (--pause)
    {"event": "done", "renewals": N}                     completed; exit code 0
    {"event": "lost", "message": M}                      OrchestratorLost; exit code 3
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

from relay.config import load_config
from relay.orchestrator.budget import RequestBudget
from relay.orchestrator.client import OrchestratorLost, RelayClient
from relay.wire.events import AgentCompleted, AgentSpawned, BudgetDecision, BudgetWarning

LOST_EXIT = 3


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def run(rid: str, seconds: float, pause: bool) -> int:
    async with RelayClient.from_config(load_config(), lease=True) as client:
        lease = client.lease
        assert lease is not None
        root, *children = agents = [uuid.uuid4() for _ in range(3)]
        try:
            await lease.hold(rid)
            emit(event="held", orchestrator=lease.orchestrator_id, agents=[str(a) for a in agents])
            await client.publish_many(
                rid,
                [
                    AgentSpawned(agent_id=a, parent_id=None if a == root else root,
                                 task_description="leased", depth=0 if a == root else 1,
                                 index=i, total=len(agents))
                    for i, a in enumerate(agents)
                ],
            )  # fmt: skip
            if pause:
                budget = RequestBudget(client.redis, client.keys, rid, total=10_000)
                state = await budget.add(9_000)

                async def publish(event: BudgetWarning | BudgetDecision) -> int:
                    return await client.publish(rid, event)

                emit(event="paused")
                outcome = await budget.pause(publish, state, timeout=60)
                emit(event="decided", decision=outcome.decision, by=outcome.decided_by)
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                for agent in agents:
                    await client.publish_text_deltas(rid, agent, [f"t{n} "])
                n += 1
                await asyncio.sleep(0.05)
            await client.publish_many(
                rid,
                [
                    AgentCompleted(agent_id=a, result_summary="ok", tokens_used=n,
                                   duration_ms=int(seconds * 1000))
                    for a in (*children, root)
                ],
            )  # fmt: skip
            emit(event="done", renewals=lease.renewals)
            return 0
        except OrchestratorLost as exc:
            emit(event="lost", message=str(exc))
            return LOST_EXIT
        finally:
            await lease.release(rid)


if __name__ == "__main__":
    sys.exit(asyncio.run(run(sys.argv[1], float(sys.argv[2]), "--pause" in sys.argv[3:])))
