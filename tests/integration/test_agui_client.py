"""The official AG-UI client (``@ag-ui/client`` from npm) follows relay requests.

``tests/js/agui/follow.mjs`` drives an ``HttpAgent`` the way an AG-UI
frontend does: the client's own pipeline verifies every event
(``verifyEvents``; any violation is an ``AGUIError`` and fails the test) and
applies it to its messages and state; a broken stream is followed by another
run on the same agent, which resumes from what the client sends back; a
budget pause is answered with ``resume``; one sub-agent is cancelled through
the REST route. The packages are installed from the committed lock file
(``npm ci``) when ``node_modules`` is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agui_support import PAUSING, history, simulations, texts
from tests.integration.test_topology import HAProxy
from tests.support import Gateway, RedisServer, RelayProcess, eventually
from tests.unit.test_deploy_files import GATEWAYS, HAPROXY

CLIENT_DIR = Path(__file__).resolve().parent.parent / "js" / "agui"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed"),
]

RUN = (*PAUSING, "--deltas", "20", "--delta-interval", "0.05", "--decision-timeout", "60")


@pytest.fixture(scope="session")
def agui_client() -> Path:
    """The official client, installed exactly as locked."""
    if not (CLIENT_DIR / "node_modules" / "@ag-ui" / "client").is_dir():
        assert NPM is not None
        subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund"], cwd=CLIENT_DIR, check=True, timeout=300
        )
    return CLIENT_DIR / "follow.mjs"


@pytest.fixture
def sims(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """``sims(rid, *args)`` starts a simulated orchestrator; all are stopped at the end."""
    yield from simulations(redis_server.url, tmp_path)


class Follower:
    """``node follow.mjs`` as a subprocess: its progress lines, then its result."""

    def __init__(self, script: Path, base: str, rid: str, options: dict[str, Any]) -> None:
        self.args = [str(script), base, rid, json.dumps(options)]
        self.progress = 0
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self.code: int | None = None

    async def run(self, timeout: float = 150) -> dict[str, Any]:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE,
            *self.args,
            cwd=CLIENT_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                async for raw in proc.stdout:
                    line = json.loads(raw)
                    self.lines.append(line)
                    self.progress = max(self.progress, int(line.get("progress", 0)))
                self.stderr = await proc.stderr.read()
                self.code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert self.code == 0, (self.code, self.lines[-1:], self.stderr[-2000:])
        result = self.lines[-1]
        assert result["done"] is True, result
        return result


def check(result: dict[str, Any], redis_url: str, rid: str) -> None:
    """What the client ended with is exactly what relay published, each thing once."""
    assert result["warnings"] == [], result["warnings"]  # nothing stripped, nothing dropped
    outcomes = [r["outcome"] for r in result["runs"]]
    assert outcomes[-1] == "success", outcomes
    assert "interrupt" in outcomes, outcomes  # the budget pause
    frames = history(redis_url, rid)
    messages = result["messages"]
    ids = Counter(m["id"] for m in messages)
    assert set(ids.values()) == {1}, ids  # no message twice
    text = {m["id"]: m.get("content") for m in messages if m["role"] == "assistant"}
    assert {k: v for k, v in text.items() if v} == texts(frames)
    state = result["state"]
    assert state["relay"]["seq"] == frames[-1]["seq"]
    assert state["agents"][result["cancelled"]]["status"] == "cancelled"
    assert "relay.cancelled" in result["subagents"]["errors"]
    ended = {
        f["agent_id"]
        for f in frames
        if f["type"] in ("agent_completed", "agent_cancelled")
        and state["agents"][f["agent_id"]]["parent_id"] is not None
    }
    tools = {m["toolCallId"].removeprefix("spawn-") for m in messages if m["role"] == "tool"}
    assert tools == ended
    assert state["last_decision"] == {"decision": "continue", "decided_by": "client"}


async def test_the_official_client_follows_a_run_with_subagents_a_cancel_and_a_pause(
    agui_client: Path,
    redis_server: RedisServer,
    start_gateway: Callable[..., Gateway],
    sims: Callable[..., RelayProcess],
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    proc = sims(rid, *RUN)
    follower = Follower(agui_client, gw.http, rid, {"cancel": True, "decision": "continue"})
    result = await follower.run()
    await eventually(lambda: not proc.alive(), 30, "simulate to exit")
    check(result, redis_server.url, rid)
    assert result["failures"] == [] and result["unhandled"] == [] and result["errors"] == []


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
async def test_the_official_client_resumes_through_the_balancer_after_a_gateway_is_killed(
    agui_client: Path,
    redis_server: RedisServer,
    start_gateway: Callable[..., Gateway],
    sims: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    gateways = {name: start_gateway() for name in GATEWAYS}
    lb = HAProxy(tmp_path, gateways).start()
    try:
        rid = str(uuid.uuid4())
        proc = sims(rid, *RUN)
        follower = Follower(agui_client, lb.http, rid, {"cancel": True, "decision": "continue"})
        task = asyncio.create_task(follower.run())

        def serving() -> list[str]:
            names = []
            for name, gw in gateways.items():
                if gw.alive() and gw.get("/readyz")[1].get("watched_requests"):
                    names.append(name)
            return names

        await eventually(lambda: follower.progress >= 40 and bool(serving()), 60, "midway")
        assert proc.alive() and not task.done(), "the run ended before the kill"
        (victim,) = serving()
        gateways[victim].stop(signal.SIGKILL)
        result = await task
        await eventually(lambda: not proc.alive(), 60, "simulate to exit")
    finally:
        lb.stop()
    check(result, redis_server.url, rid)
    assert result["failures"], "the client never saw its stream break"
    network = ("terminated", "other side closed", "fetch failed", "ECONNRESET", "socket")
    for error in result["unhandled"] + result["errors"]:
        assert any(n in error for n in network), error
    assert "disconnected" in [r["outcome"] for r in result["runs"]]
