"""A minimal orchestrator process for tests: cancel tokens registered on command.

It uses :class:`relay.CancelRegistry` the way ``relay simulate`` does, and
nothing else, so a test can put the agents of one request tree in several
processes ("hosts") and see which of them a cancel reaches.

Run as ``python orchestrator_worker.py REDIS_URL [POLL_INTERVAL]``. It speaks
JSON lines. On stdin::

    {"op": "register", "id": X, "lineage": [request_id, ..., parent_id]}
    {"op": "status"}

On stdout::

    {"event": "ready"}                                  the registry is subscribed
    {"event": "registered", "id": X, "cancelled": B}    B: it started cancelled
    {"event": "cancelled", "id": X, "by": Y, "reason": R}
    {"event": "status", "cancelled": {X: B, ...}}

It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from relay.aio import cancel_and_wait
from relay.orchestrator.cancel import CancelRegistry, CancelToken
from relay.orchestrator.client import RelayClient


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def report(tok: CancelToken) -> None:
    reason = await tok.wait()
    emit(event="cancelled", id=tok.id, by=tok.cancelled_by, reason=reason)


async def serve(url: str, poll_interval: float) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
    )
    tokens: dict[str, CancelToken] = {}
    watchers: list[asyncio.Task[None]] = []
    async with RelayClient.from_url(url) as client:
        registry = CancelRegistry(client.redis, client.keys, poll_interval=poll_interval)
        await registry.start()
        try:
            emit(event="ready")
            while line := await stdin.readline():
                cmd = json.loads(line)
                if cmd["op"] == "register":
                    tok = await registry.token(cmd["id"], lineage=cmd["lineage"])
                    tokens[tok.id] = tok
                    watchers.append(asyncio.create_task(report(tok)))
                    emit(event="registered", id=tok.id, cancelled=tok.is_cancelled())
                elif cmd["op"] == "status":
                    emit(
                        event="status",
                        cancelled={i: t.is_cancelled() for i, t in tokens.items()},
                    )
                else:
                    emit(event="error", message=f"unknown op {cmd['op']!r}")
        finally:
            await cancel_and_wait(*watchers)
            await registry.close()
            transport.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0))
