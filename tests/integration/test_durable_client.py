"""The official Durable Streams TypeScript client (@durable-streams/client) follows relay.

``tests/js/durable/follow.mjs`` drives the client: it reads a live simulated
request from ``-1``, stops after some events and resumes from the offset it
got, tails with long-poll or SSE, and exits once it sees the stream close.
Once directly against a gateway, once through HAProxy in front of the
gateways with the one serving it SIGKILLed midway.

The client is installed with ``npm ci`` from the committed lock file when
``node_modules`` is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.orchestrator.client import RelayClient
from tests.integration.durable_support import PATH, Run
from tests.integration.test_topology import HAProxy
from tests.support import Gateway, RedisServer, RelayProcess, eventually, http_get
from tests.unit.test_deploy_files import GATEWAYS, HAPROXY

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
]

StartGateway = Callable[..., Gateway]
CLIENT_DIR = Path(__file__).parents[1] / "js" / "durable"
FOLLOW = CLIENT_DIR / "follow.mjs"
QUIET = ("--tokens-per-delta", "1", "--seed", "7")
RUN = ("--agents", "3", "--depth", "2", "--deltas", "60", "--delta-interval", "0.03")
LONG_RUN = ("--agents", "3", "--depth", "2", "--deltas", "60", "--delta-interval", "0.04")


@pytest.fixture(scope="session")
def durable_client() -> Path:
    """The follow script, with @durable-streams/client installed next to it."""
    if not (CLIENT_DIR / "node_modules" / "@durable-streams" / "client").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT_DIR, check=True, timeout=300
        )
    return FOLLOW


@dataclass
class Follower:
    """``node follow.mjs`` running, its JSON lines collected as they arrive."""

    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(json.loads(raw))

    @property
    def batches(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "items" in line]

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "session" in line]

    @property
    def seqs(self) -> list[int]:
        return [seq for batch in self.batches for seq, _ in batch["items"]]

    async def wait(self, timeout: float) -> int:
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                if self.reader is not None:
                    await self.reader
        except TimeoutError:
            raise AssertionError(f"the client did not finish: {self.lines[-5:]}") from None
        return code


@contextlib.asynccontextmanager
async def follow(script: Path, url: str, live: str, *args: str) -> AsyncIterator[Follower]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), url, live, *args, stdout=asyncio.subprocess.PIPE
    )
    follower = Follower(proc)
    follower.reader = asyncio.create_task(follower.read())
    try:
        yield follower
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await follower.reader


def simulate(redis: RedisServer, workdir: Path, rid: str, *args: str) -> RelayProcess:
    proc = RelayProcess(
        ["simulate", "--request-id", rid, *args, *QUIET],
        {"RELAY_REDIS_URL": redis.url},
        workdir / f"simulate-{rid[:8]}.log",
    )
    return proc.start()


def final_seq(base: str, rid: str) -> int:
    """The seq the stream closed at, from HEAD (the tail offset of a closed stream)."""
    import urllib.request

    with urllib.request.urlopen(
        urllib.request.Request(base + PATH.format(rid), method="HEAD"), timeout=5
    ) as resp:
        assert resp.headers["stream-closed"] == "true"
        return int(resp.headers["stream-next-offset"].rpartition("_")[2], 16)


def check_followed(follower: Follower, final: int) -> None:
    """Every event exactly once, in order, and the closure seen last."""
    assert follower.seqs == list(range(1, final + 1)), (
        f"{len(follower.seqs)} events, expected {final}: repeats or gaps"
    )
    assert follower.batches[-1]["closed"] is True
    assert follower.sessions[-1]["closed"] is True
    offsets = [b["offset"] for b in follower.batches]
    assert offsets == sorted(offsets), "offsets must sort in stream order"


async def stream_exists(base: str, rid: str) -> None:
    await eventually(
        lambda: http_get(base + PATH.format(rid))[0] == 200, 30, "the request's first event"
    )


@pytest.mark.parametrize("live", ["long-poll", "sse"])
async def test_official_client_follows_resumes_and_sees_the_close(
    durable_client: Path,
    start_gateway: StartGateway,
    redis_server: RedisServer,
    tmp_path: Path,
    live: str,
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    sim = simulate(redis_server, tmp_path, rid, *RUN)
    try:
        await stream_exists(gw.http, rid)
        async with follow(
            durable_client, gw.http + PATH.format(rid), live, "--pause-after", "15"
        ) as f:
            await eventually(lambda: bool(f.batches), 30, "a first batch")
            assert sim.alive(), "the run ended before the client started: make it longer"
            assert await f.wait(120) == 0, f.lines[-5:]
    finally:
        sim.stop(signal.SIGKILL)
    check_followed(f, final_seq(gw.http, rid))
    first, second = f.sessions[0], f.sessions[1]
    assert first["from"] == "-1" and first["paused"] is True
    # The second session resumed from the offset the client was given.
    assert second["from"] == first["offset"]
    assert first["offset"] in {b["offset"] for b in f.batches}
    # It tailed live: batches after catching up carry the server's cursor.
    live_batches = [b for b in f.batches if b["cursor"] is not None]
    assert live_batches and all(b["upToDate"] for b in live_batches)


@pytest.fixture
def balanced(
    tmp_path: Path, start_gateway: StartGateway
) -> Iterator[tuple[HAProxy, dict[str, Gateway]]]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    gateways = {name: start_gateway() for name in GATEWAYS}
    lb = HAProxy(tmp_path, gateways)
    try:
        lb.start()
        yield lb, gateways
    finally:
        lb.stop()


def watching(gateways: dict[str, Gateway]) -> list[str]:
    """Gateways that have a live read (or any viewer) registered with their hub."""
    names = []
    for name, gw in gateways.items():
        if gw.alive():
            status, raw = http_get(gw.http + "/readyz")
            if status == 200 and json.loads(raw)["watched_requests"] > 0:
                names.append(name)
    return names


@pytest.mark.parametrize("live", ["long-poll", "sse"])
async def test_official_client_survives_a_gateway_sigkill_behind_haproxy(
    durable_client: Path,
    balanced: tuple[HAProxy, dict[str, Gateway]],
    redis_server: RedisServer,
    tmp_path: Path,
    live: str,
) -> None:
    lb, gateways = balanced
    rid = str(uuid.uuid4())
    sim = simulate(redis_server, tmp_path, rid, *LONG_RUN)
    try:
        await stream_exists(lb.http, rid)
        async with follow(durable_client, lb.http + PATH.format(rid), live) as f:
            await eventually(lambda: len(f.seqs) >= 20, 30, "20 events through the balancer")
            await eventually(lambda: bool(watching(gateways)), 15, "a gateway serving the read")
            victim = watching(gateways)[0] if watching(gateways) else None
            assert victim is not None
            seen_at_kill = len(f.seqs)
            gateways[victim].stop(signal.SIGKILL)
            assert sim.alive(), "the run ended before the kill: make it longer"
            assert await f.wait(180) == 0, f.lines[-5:]
    finally:
        sim.stop(signal.SIGKILL)
    final = final_seq(lb.http, rid)
    assert final > seen_at_kill, "nothing was published after the kill"
    check_followed(f, final)
    if live == "sse":
        # The killed response failed; the client resumed from its last offset.
        assert len(f.sessions) >= 2 and "error" in f.sessions[0], f.sessions


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with ``appendonly yes`` (fsync always): a restart keeps every key."""
    server = RedisServer(tmp_path / "aof-redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.mark.parametrize("live", ["long-poll", "sse"])
async def test_official_client_follows_through_a_redis_restart(
    durable_client: Path,
    start_gateway: StartGateway,
    aof_redis: RedisServer,
    live: str,
) -> None:
    gw = start_gateway(redis_url=aof_redis.url)
    async with RelayClient.from_url(aof_redis.url, publish_retry_seconds=20) as client:
        run = Run(client)
        await run.start()
        restarted = asyncio.Event()

        async def orchestrate() -> None:
            # Publishes across the outage (the SDK retries them), then ends the request.
            for i in range(400):
                await run.delta(f"d{i}")
                if restarted.is_set() and i >= 300:
                    break
                await asyncio.sleep(0.01)
            await run.complete()

        async with follow(durable_client, gw.http + PATH.format(run.request_id), live) as f:
            publisher = asyncio.create_task(orchestrate())
            try:
                await eventually(lambda: len(f.seqs) >= 20, 30, "20 events")
                seen = len(f.seqs)
                await asyncio.to_thread(aof_redis.restart, 0.3)
                restarted.set()
                assert not publisher.done(), "the run ended before the restart"
                await publisher
                assert await f.wait(180) == 0, f.lines[-5:]
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
    final = final_seq(gw.http, run.request_id)
    assert final > seen
    check_followed(f, final)
