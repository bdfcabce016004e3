"""Helpers of the lease tests and of benchmarks/lease_bound.py: an orchestrator process
(``lease_worker.py``) and viewers that note when each event reached them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support import Gateway, WsClient

WORKER = Path(__file__).with_name("lease_worker.py")

RENEW_INTERVAL = 0.25
TTL = 2.0
REAP_INTERVAL = 0.2
LEASE_ENV = {
    "RELAY_LEASE_RENEW_INTERVAL": str(RENEW_INTERVAL),
    "RELAY_LEASE_TTL_SECONDS": str(TTL),
    "RELAY_LEASE_REAP_INTERVAL": str(REAP_INTERVAL),
}
"""The same [lease] settings for the orchestrator and the gateways."""
BOUND = TTL + REAP_INTERVAL + 3.0
"""SIGKILL to terminal events at a viewer, at most: the lease runs out (<= TTL), the
next scan (<= REAP_INTERVAL), one publish; plus slack for a loaded machine."""


class LeaseWorker:
    """One ``lease_worker.py`` process: its JSON lines, signals, exit code."""

    def __init__(
        self, redis_url: str, rid: str, seconds: float, log: Path, *, pause: bool = False
    ) -> None:
        self.args = [str(WORKER), rid, str(seconds), *(["--pause"] if pause else [])]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            "RELAY_REDIS_URL": redis_url,
            **LEASE_ENV,
        }
        self.log = log
        self.messages: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> LeaseWorker:
        err = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=self.env,
            )
        finally:
            os.close(err)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.messages.append(json.loads(line))

    def message(self, event: str) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get("event") == event), None)

    async def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (found := self.message(event)) is None:
            # The worker exited without saying it: no point waiting longer.
            if time.monotonic() > deadline or (self._reader is not None and self._reader.done()):
                raise TimeoutError(
                    f"no {event!r} from the worker: {self.messages}\n{self.output()}"
                )
            await asyncio.sleep(0.02)
        return found

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        """Kill it if it still runs (a SIGSTOPped process too) and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def failed_agents(viewer: WsClient, rid: str) -> list[str]:
    return [f["agent_id"] for f in viewer.events(rid) if f["type"] == "agent_failed"]


async def until_all(viewers: list[WsClient], done: Any, timeout: float, what: str) -> list[float]:
    """Poll until ``done(viewer)`` holds for every viewer; when each first did (monotonic)."""
    seen: list[float | None] = [None] * len(viewers)
    deadline = time.monotonic() + timeout
    while any(t is None for t in seen):
        now = time.monotonic()
        for i, viewer in enumerate(viewers):
            if seen[i] is None and done(viewer):
                seen[i] = now
        if any(t is None for t in seen) and now > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}: {seen}")
        await asyncio.sleep(0.005)
    return [t for t in seen if t is not None]


def viewer_urls(gateways: list[Gateway], rid: str) -> list[str]:
    """Two viewers per gateway, resuming from the start of the request."""
    return [f"{gw.ws_url}?request_id={rid}&after_seq=0" for gw in gateways for _ in range(2)]


async def open_viewers(urls: list[str]) -> list[WsClient]:
    viewers = [WsClient(u) for u in urls]
    for viewer in viewers:
        await viewer.__aenter__()
    return viewers


async def kill_and_measure(
    redis_url: str, gateways: list[Gateway], tmp_path: Path, run: int = 0
) -> list[float]:
    """SIGKILL an orchestrator mid-run; seconds until each viewer had every terminal event.

    Checks on the way that every viewer saw each running agent fail exactly once.
    """
    rid = str(uuid.uuid4())
    worker = LeaseWorker(redis_url, rid, 60, tmp_path / f"worker-{run}.log")
    viewers = await open_viewers(viewer_urls(gateways, rid))
    try:
        await worker.start()
        held = await worker.expect("held")
        agents = set(held["agents"])
        # Mid-run: every viewer has the tree and some text.
        await until_all(
            viewers,
            lambda v: sum(f["type"] == "agent_text_delta" for f in v.events(rid)) >= 6,
            20,
            "text deltas at every viewer",
        )
        killed = time.monotonic()
        worker.signal(signal.SIGKILL)
        arrived = await until_all(
            viewers, lambda v: set(failed_agents(v, rid)) == agents, BOUND + 5, "agent_failed"
        )
        # Nothing more arrives: no second copy from the other gateway's reaper.
        await asyncio.sleep(2 * 0.2 + 0.5)
        for viewer in viewers:
            counts = Counter(failed_agents(viewer, rid))
            assert counts == dict.fromkeys(agents, 1), counts
            failures = [f for f in viewer.events(rid) if f["type"] == "agent_failed"]
            assert all("orchestrator lost" in f["error"] for f in failures), failures
            assert failures[-1]["agent_id"] == held["agents"][0]  # the root last
            seqs = [f["seq"] for f in viewer.events(rid)]
            assert seqs == list(range(1, len(seqs) + 1)), seqs  # in order, no hole
        return [t - killed for t in arrived]
    finally:
        await worker.stop()
        for viewer in viewers:
            await viewer.close()
