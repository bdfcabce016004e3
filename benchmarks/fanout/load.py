"""Load: the Node client processes and the publisher (relay's SDK).

The clients are ``node/client.js`` processes (the ``ws`` package), a few
hundred to a few thousand connections each; their CPU time is read from
``/proc`` like the servers', to show they are not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.fanout.systems import cpu_seconds
from relay.orchestrator.client import RelayClient

NODE_DIR = Path(__file__).resolve().parent / "node"


@dataclass
class Done:
    """What every client process reported at the end of a phase, merged."""

    first: float
    last: float
    others: int
    latencies_ms: list[float] = field(default_factory=list)


class Clients:
    """``count`` connections to ``url`` over ``procs`` Node processes."""

    def __init__(self, url: str, count: int, procs: int, *, sse: bool = False) -> None:
        self.url, self.count, self.sse = url, count, sse
        self.nprocs = max(1, min(procs, count))
        self.procs: list[asyncio.subprocess.Process] = []
        self.lines: list[asyncio.Queue[dict[str, Any]]] = []
        self.readers: list[asyncio.Task[None]] = []
        self.ready = 0
        self.failed = 0
        self.reached_at: list[int] = []
        """The latest target every connection of each process has reached."""
        self.progress = asyncio.Event()

    async def start(self, timeout: float = 120.0) -> Clients:
        node = shutil.which("node") or "node"
        per, extra = divmod(self.count, self.nprocs)
        for i in range(self.nprocs):
            n = per + (1 if i < extra else 0)
            argv = [node, str(NODE_DIR / "client.js"), self.url, str(n)]
            if self.sse:
                argv.append("--sse")
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 28,  # a phase's latencies come back as one JSON line
            )
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            self.procs.append(proc)
            self.lines.append(queue)
            self.reached_at.append(0)
            self.readers.append(asyncio.create_task(self._read(i, proc, queue)))
        for queue in self.lines:
            msg = await asyncio.wait_for(self._next(queue, "ready"), timeout)
            self.ready += msg["ready"]
            self.failed += msg["failed"]
        return self

    async def _read(
        self, i: int, proc: asyncio.subprocess.Process, queue: asyncio.Queue[dict[str, Any]]
    ) -> None:
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                msg = json.loads(line)
                if "reached" in msg:
                    # Progress is state, not a message: whoever waits reads the latest.
                    self.reached_at[i] = max(self.reached_at[i], msg["reached"])
                    self.progress.set()
                    continue
                queue.put_nowait(msg)
        finally:
            queue.put_nowait({"exited": True})  # a waiter fails instead of hanging
            self.progress.set()

    @staticmethod
    async def _next(queue: asyncio.Queue[dict[str, Any]], key: str) -> dict[str, Any]:
        while True:
            msg = await queue.get()
            if key in msg:
                return msg
            if "exited" in msg:
                raise RuntimeError("a load client exited")

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def cpu_each(self) -> list[float]:
        return [cpu_seconds(p.pid) for p in self.procs]

    async def expect(self, total: int, step: int, latency: bool) -> None:
        cmd = json.dumps({"cmd": "expect", "total": total, "step": step, "latency": latency})
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(cmd.encode() + b"\n")
            await proc.stdin.drain()
        self.reached_at = [0] * len(self.procs)
        for queue in self.lines:
            await self._next(queue, "expecting")

    async def reached(self, value: int) -> None:
        """Every connection has ``value`` events of this phase (not the last target)."""
        while min(self.reached_at) < value:
            if any(p.returncode is not None for p in self.procs):
                raise RuntimeError("a load client exited")
            self.progress.clear()
            await self.progress.wait()

    async def done(self) -> Done:
        results = [await self._next(q, "done") for q in self.lines]
        lat: list[float] = []
        for r in results:
            lat.extend(r["latencies"])
        return Done(
            min(r["first"] for r in results) / 1000,
            max(r["last"] for r in results) / 1000,
            sum(r["others"] for r in results),
            lat,
        )

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b'{"cmd":"close"}\n')
                await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def text_for(size: int) -> str:
    """Padding that makes the published frame about ``size`` bytes (the frame's
    other fields, seq, ts and the clock prefix included, take 200)."""
    return "x" * max(0, size - 200)


def delta(agent: str, text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": agent, "text": text}


class Publisher:
    """Publishes through relay's SDK (one RelayClient, as an orchestrator would)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.client: RelayClient | None = None
        self.agent = str(uuid.uuid4())

    async def __aenter__(self) -> Publisher:
        self.client = RelayClient.from_url(self.redis_url)
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.__aexit__(None, None, None)

    async def paced(self, rid: str, count: int, rate: float, size: int) -> None:
        """``count`` single publishes at ``rate``/s; each text starts with the wall clock."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        pad = text_for(size)
        start = loop.time()
        for i in range(count):
            ahead = start + i / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await self.client.publish(rid, delta(self.agent, f"{time.time():.6f} {pad}"))

    async def burst(self, rid: str, count: int, size: int, batch: int = 50) -> None:
        """``count`` events as fast as the SDK goes: batches, four in flight."""
        assert self.client is not None
        client = self.client
        pad = text_for(size)
        sizes = [min(batch, count - i) for i in range(0, count, batch)]

        async def one(n: int) -> None:
            now = f"{time.time():.6f} {pad}"
            await client.publish_many(rid, [delta(self.agent, now)] * n)

        for i in range(0, len(sizes), 4):
            await asyncio.gather(*(one(n) for n in sizes[i : i + 4]))
