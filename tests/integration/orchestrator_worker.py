"""A minimal orchestrator process for tests: agents started on command, on the SDK.

It runs agents with ``relay.connect`` / ``rc.request`` / ``req.agent`` the
way a real orchestrator does, so a test can put the agents of one request
tree in several processes ("hosts") and see which of them a cancel reaches
and how they end. Every agent waits in an ``await`` that only a cancel ends.

Run as ``python orchestrator_worker.py REDIS_URL [POLL_INTERVAL]``. It speaks
JSON lines. On stdin::

    {"op": "register", "id": X, "lineage": [request_id, ..., parent_id]}
        lineage [] opens request X in this process; otherwise X is an agent
        below the lineage (a root agent when the lineage is [request_id])
    {"op": "cancel", "id": X}                           cancel X on every host
    {"op": "status"}

On stdout::

    {"event": "ready"}                                  connected
    {"event": "registered", "id": X, "cancelled": B}    B: it started cancelled
    {"event": "cancelled", "id": X, "by": Y, "reason": R, "interrupted": I}
        agent X ended cancelled; I: its pending await was interrupted
    {"event": "cancel_sent", "id": X}
    {"event": "status", "cancelled": {X: B, ...}}

It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import relay
from relay.aio import cancel_and_wait


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Worker:
    def __init__(self, rc: relay.RelayConnection) -> None:
        self.rc = rc
        self.requests: dict[str, relay.Request] = {}
        self.agents: dict[str, relay.Agent] = {}
        self.registered: set[str] = set()
        """Requests registered by name (not only opened for their agents)."""
        self.request_tasks: list[asyncio.Task[None]] = []
        self.agent_tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.shutting_down = False

    async def request(self, rid: str) -> relay.Request:
        if rid not in self.requests:
            opened: asyncio.Future[relay.Request] = asyncio.get_running_loop().create_future()

            async def hold() -> None:
                async with self.rc.request(rid) as req:
                    opened.set_result(req)
                    await self.stop.wait()

            task = asyncio.create_task(hold())
            self.request_tasks.append(task)
            await asyncio.wait([opened, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            if task.done():
                task.result()  # raises why the request could not open
            self.requests[rid] = opened.result()
        return self.requests[rid]

    async def agent(self, agent_id: str, lineage: list[str]) -> relay.Agent:
        req = await self.request(lineage[0])
        parent = relay.AgentRef(tuple(lineage)) if len(lineage) > 1 else None
        entered: asyncio.Future[relay.Agent] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            interrupted = False
            async with req.agent(f"agent {agent_id}", parent=parent, agent_id=agent_id) as agent:
                entered.set_result(agent)
                try:
                    await asyncio.Event().wait()  # blocked until a cancel interrupts it
                except asyncio.CancelledError:
                    interrupted = True
                    raise
            if not self.shutting_down:
                emit(
                    event="cancelled",
                    id=agent.id,
                    by=agent.cancelled_by,
                    reason=agent.cancel_reason,
                    interrupted=interrupted,
                )

        task = asyncio.create_task(run())
        self.agent_tasks.append(task)
        await asyncio.wait([entered, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if not entered.done():
            task.result()
        agent = entered.result()
        self.agents[agent.id] = agent
        return agent

    def status(self) -> dict[str, bool]:
        out = {rid: self.requests[rid].is_cancelled for rid in self.registered}
        out.update({aid: agent.is_cancelled for aid, agent in self.agents.items()})
        return out

    async def close(self) -> None:
        self.shutting_down = True
        # Agents first (each announces itself), then the requests.
        await cancel_and_wait(*self.agent_tasks)
        self.stop.set()
        for task in self.request_tasks:
            await task


async def serve(url: str, poll_interval: float) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
    )
    config = relay.GlobalConfig(
        redis=relay.RedisConfig(url=url), cancel=relay.CancelConfig(poll_interval=poll_interval)
    )
    async with relay.connect(config) as rc:
        worker = Worker(rc)
        try:
            emit(event="ready")
            while line := await stdin.readline():
                cmd = json.loads(line)
                if cmd["op"] == "register":
                    if cmd["lineage"]:
                        agent = await worker.agent(cmd["id"], cmd["lineage"])
                        emit(event="registered", id=agent.id, cancelled=agent.is_cancelled)
                    else:
                        req = await worker.request(cmd["id"])
                        worker.registered.add(req.id)
                        emit(event="registered", id=req.id, cancelled=req.is_cancelled)
                elif cmd["op"] == "cancel":
                    await rc.cancel(cmd["id"])
                    emit(event="cancel_sent", id=cmd["id"])
                elif cmd["op"] == "status":
                    emit(event="status", cancelled=worker.status())
                else:
                    emit(event="error", message=f"unknown op {cmd['op']!r}")
        finally:
            await worker.close()
            transport.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0))
