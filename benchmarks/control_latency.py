"""Control-path latency on loopback: gateway -> Redis -> orchestrator.

Starts its own redis-server on a free port and one ``relay gateway`` process,
then, in this process, plays both ends: a WebSocket client that sends
commands to the gateway, and an orchestrator (CancelRegistry, RequestBudget)
that receives them. Both ends share one clock, so each sample is

* cancel:   client sends ``cancel_agent`` -> the agent's CancelToken fires
            (tombstone + nudge through Redis, pub/sub to the registry);
* decision: client sends ``budget_continue`` -> ``RequestBudget.pause``
            returns (first-answer-wins script, BLPOP wake-up);
* ack:      client sends a command -> the gateway's ``ack`` arrives.

Numbers only, no assertions: ``python benchmarks/control_latency.py [-n 300]``.
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

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.orchestrator.budget import BudgetState, BudgetStatus, RequestBudget
from relay.orchestrator.cancel import CancelRegistry
from relay.orchestrator.client import RelayClient
from relay.wire.events import BudgetDecision, BudgetWarning
from tests.support import Gateway, RedisServer


def report(name: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(
        f"{name:<9} n={len(ms):<4} p50={statistics.median(ms):6.2f} ms  "
        f"p99={p99:6.2f} ms  max={ms[-1]:6.2f} ms"
    )


class _Warned:
    """A publish function for the pause that only notes when the warning went out."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    async def __call__(self, event: BudgetWarning | BudgetDecision) -> None:
        if isinstance(event, BudgetWarning):
            self.event.set()


async def ack(ws: Any, command: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(command))
    while True:
        frame: dict[str, Any] = json.loads(await ws.recv())
        if frame.get("type") in ("ack", "error"):
            return frame


async def measure(redis_url: str, ws_url: str, n: int) -> None:
    client = RelayClient.from_url(redis_url)
    # A long poll interval: only the nudge path is measured.
    registry = CancelRegistry(client.redis, client.keys, poll_interval=60)
    await registry.start()
    cancels: list[float] = []
    decisions: list[float] = []
    acks: list[float] = []
    try:
        async with websockets.connect(ws_url) as ws:
            # Subscribe to a quiet request so no event frames arrive.
            await ws.send(json.dumps({"type": "subscribe", "request_id": str(uuid.uuid4())}))
            json.loads(await ws.recv())
            rid = str(uuid.uuid4())
            root = await registry.token(rid)
            for _ in range(n):
                token = await root.child(str(uuid.uuid4()))
                started = time.perf_counter()
                command = {"type": "cancel_agent", "agent_id": token.id}
                send = asyncio.ensure_future(ack(ws, command))
                await token.wait()
                cancels.append(time.perf_counter() - started)
                assert (await send)["type"] == "ack"
                acks.append(time.perf_counter() - started)
                token.release()
            for _ in range(n):
                budget = RequestBudget(client.redis, client.keys, str(uuid.uuid4()))
                opened = asyncio.Event()
                publish = _Warned(opened)
                state = BudgetState(BudgetStatus.WARNING, 400_000, 500_000)
                pause = asyncio.ensure_future(budget.pause(publish, state, timeout=10))
                await opened.wait()
                started = time.perf_counter()
                answer = {"type": "budget_continue", "request_id": budget.request_id}
                send = asyncio.ensure_future(ack(ws, answer))
                outcome = await pause
                decisions.append(time.perf_counter() - started)
                assert outcome.decided_by == "client"
                assert (await send)["type"] == "ack"
    finally:
        await registry.close()
        await client.aclose()
    print(f"control latency on loopback, {n} samples each")
    print("(client -> gateway -> Redis -> orchestrator; ack: client -> gateway -> client)")
    report("cancel", cancels)
    report("decision", decisions)
    report("ack", acks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="samples per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        gateway = Gateway(redis.url, Path(tmp) / "gateway.log")
        try:
            gateway.start()
            asyncio.run(measure(redis.url, gateway.ws_url, args.n))
        finally:
            gateway.stop()
            redis.stop()


if __name__ == "__main__":
    main()
