"""The README's claim that cancelling an agent reaches its descendants on any host.

Orchestrator processes (``orchestrator_worker.py``, a CancelRegistry and
nothing else) share one request tree::

    request            (A)
    ├── root           (A)   ← cancelled by a WebSocket client on a gateway
    │   └── child      (B)
    │       └── grand  (A)
    │           └── late   (C, a process started after the cancel)
    ├── other          (A)   unrelated subtree: must stay alive
    │   └── other_kid  (B)
    │       └── other_late (C)
    └── marker         (A and B)   cancelled last, as a barrier

The lineage of each agent is passed to the other process the way an
orchestrator hands work to another host. The workers poll tombstones only
every minute, so what reaches them within the bound is the nudge, routed by
lineage; the late process can only learn it from the tombstones.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]

WORKER = Path(__file__).with_name("orchestrator_worker.py")
# Cancel → every descendant's token, across processes (measured: milliseconds).
BOUND = 1.0
# Tombstone polls far apart: within BOUND only the nudge can reach a token.
POLL_INTERVAL = 60.0


class Worker:
    """One orchestrator process, driven over its stdin/stdout JSON lines."""

    def __init__(self, redis_url: str, log: Path) -> None:
        self.redis_url = redis_url
        self.log = log
        self.messages: list[dict[str, Any]] = []
        self.cancelled: dict[str, float] = {}
        """Agent id → when the test heard of its cancellation (monotonic)."""
        self.by: dict[str, str] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Worker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        # stderr (tracebacks) goes to a log the failure messages quote.
        err = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                self.redis_url,
                str(POLL_INTERVAL),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
            )
        finally:
            os.close(err)
        self._reader = asyncio.create_task(self._read())
        try:
            await self._expect("ready", 15)
        except BaseException:
            await self.__aexit__(*sys.exc_info())  # not called when __aenter__ fails
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        hung = False
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            hung = True
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader
        if exc[0] is None:
            # A registry that cannot shut down, or a worker that crashed, is a failure too.
            assert not hung, f"worker did not exit on end of input:\n{self.output()}"
            assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{self.output()}"

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            msg = json.loads(line)
            self.messages.append(msg)
            if msg["event"] == "cancelled":
                self.cancelled.setdefault(msg["id"], time.monotonic())
                self.by[msg["id"]] = msg["by"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def _expect(self, event: str, timeout: float, after: int = 0) -> dict[str, Any]:
        def found() -> bool:
            return any(m["event"] in (event, "error") for m in self.messages[after:])

        try:
            await eventually(found, timeout, f"worker event {event!r}")
        except TimeoutError:
            raise TimeoutError(f"no {event!r} from the worker:\n{self.output()}") from None
        reply = next(m for m in self.messages[after:] if m["event"] in (event, "error"))
        assert reply["event"] == event, reply
        return reply

    async def _call(self, cmd: dict[str, Any], event: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        before = len(self.messages)
        self._proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._expect(event, 10, before)

    async def register(self, agent: str, lineage: list[str]) -> bool:
        """Register ``agent`` below ``lineage``; True when it started cancelled."""
        reply = await self._call({"op": "register", "id": agent, "lineage": lineage}, "registered")
        assert reply["id"] == agent
        return bool(reply["cancelled"])

    async def status(self) -> dict[str, bool]:
        reply = await self._call({"op": "status"}, "status")
        return dict(reply["cancelled"])


async def test_cancel_of_an_agent_reaches_its_descendants_in_other_processes(
    tmp_path: Path, redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid, root, child, grand, other, other_kid, marker = (str(uuid.uuid4()) for _ in range(7))
    async with (
        Worker(redis_server.url, tmp_path / "host-a.log") as a,
        Worker(redis_server.url, tmp_path / "host-b.log") as b,
        WsClient(gw.ws_url) as ui,
    ):
        started_cancelled = [
            await a.register(rid, []),
            await a.register(root, [rid]),
            await b.register(child, [rid, root]),
            await a.register(grand, [rid, root, child]),
            await a.register(other, [rid]),
            await b.register(other_kid, [rid, other]),
            await a.register(marker, [rid]),
            await b.register(marker, [rid]),
        ]
        assert not any(started_cancelled)

        sent = time.monotonic()
        ack = await ui.request({"type": "cancel_agent", "agent_id": root}, "ack")
        assert ack["type"] == "ack" and ack["agent_id"] == root, ack

        def reached() -> bool:
            return root in a.cancelled and child in b.cancelled and grand in a.cancelled

        try:
            await eventually(reached, 5, "every descendant of root cancelled")
        except TimeoutError:
            pytest.fail(f"cancelled in A: {sorted(a.cancelled)}, in B: {sorted(b.cancelled)}")
        latency = max(a.cancelled[root], b.cancelled[child], a.cancelled[grand]) - sent
        assert latency < BOUND, f"descendants reached after {latency:.3f}s"
        # Each one knows which ancestor's cancel reached it.
        assert a.by[root] == b.by[child] == a.by[grand] == root

        # Barrier: nudges arrive in order on one channel, so once the marker's
        # cancel has reached both processes, root's cancel has been applied
        # everywhere it was going to be.
        await ui.request({"type": "cancel_agent", "agent_id": marker}, "ack")
        await eventually(
            lambda: marker in a.cancelled and marker in b.cancelled, 5, "marker cancelled"
        )
        assert await a.status() == {
            rid: False, root: True, grand: True, other: False, marker: True
        }  # fmt: skip
        assert await b.status() == {child: True, other_kid: False, marker: True}
        assert set(a.cancelled) == {root, grand, marker}
        assert set(b.cancelled) == {child, marker}

        # A host that starts work below the cancelled agent only now (its
        # registry never saw the nudge) finds the ancestor's tombstone.
        late, other_late = str(uuid.uuid4()), str(uuid.uuid4())
        async with Worker(redis_server.url, tmp_path / "host-c.log") as c:
            assert await c.register(late, [rid, root, child, grand]) is True
            assert await c.register(other_late, [rid, other, other_kid]) is False
            await eventually(lambda: late in c.cancelled, 5, "late agent reported cancelled")
            assert c.by[late] == root
            assert await c.status() == {late: True, other_late: False}
