"""The docker-compose topology as local processes: Redis, three gateways, HAProxy, simulate.

HAProxy runs the repository's ``deploy/haproxy.cfg`` with only the bind and
server addresses rewritten (:func:`localize_haproxy_cfg`), so its timeouts,
health checks on ``/readyz``, balancing and retry settings are the ones that
ship. Every client talks to the balancer only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.support import (
    Gateway,
    RedisServer,
    RelayProcess,
    WsClient,
    eventually,
    free_port,
    http_get,
    http_post_json,
    wait_for,
)
from tests.unit.test_deploy_files import GATEWAYS, HAPROXY, HAPROXY_CFG, localize_haproxy_cfg

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed"),
]

StartGateway = Callable[..., Gateway]


class HAProxy:
    """haproxy in the foreground on a free port, fronting the given gateways."""

    def __init__(self, workdir: Path, gateways: dict[str, Gateway]) -> None:
        self.port = free_port()
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(
            localize_haproxy_cfg(
                HAPROXY_CFG.read_text(), self.port, {n: g.port for n, g in gateways.items()}
            )
        )
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/events"

    def start(self) -> HAProxy:
        assert HAPROXY is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: self.get("/readyz")[0] == 200, 10, what="haproxy forwarding /readyz")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def get(self, path: str) -> tuple[int, str]:
        status, raw = http_get(self.http + path)
        return status, raw.decode()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, answer = http_post_json(self.http + path, body)
        return status, answer

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Topology:
    redis: RedisServer
    gateways: dict[str, Gateway]
    lb: HAProxy
    workdir: Path
    simulations: list[RelayProcess] = field(default_factory=list)

    def simulate(self, request_id: str, *args: str) -> RelayProcess:
        proc = RelayProcess(
            ["simulate", "--request-id", request_id, *args],
            {"RELAY_REDIS_URL": self.redis.url, "RELAY_CANCEL_POLL_INTERVAL": "0.5"},
            self.workdir / f"simulate-{len(self.simulations)}.log",
        )
        self.simulations.append(proc)
        return proc.start()

    def connections(self, name: str) -> int:
        """Open WebSocket connections of one gateway, from its /metrics."""
        with urllib.request.urlopen(self.gateways[name].http + "/metrics", timeout=3) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("relay_connections "):
                return int(float(line.split()[1]))
        raise AssertionError("relay_connections missing from /metrics")


@pytest.fixture
def topology(
    tmp_path: Path, redis_server: RedisServer, start_gateway: StartGateway
) -> Iterator[Topology]:
    gateways = {name: start_gateway() for name in GATEWAYS}
    lb = HAProxy(tmp_path, gateways)
    topo = Topology(redis_server, gateways, lb, tmp_path)
    try:
        lb.start()
        yield topo
    finally:
        for sim in topo.simulations:
            sim.stop(signal.SIGKILL)
        lb.stop()


# A run long enough to outlive a gateway kill, short enough for a test.
LONG_RUN = ("--agents", "3", "--depth", "2", "--deltas", "400", "--delta-interval", "0.05")
SHORT_RUN = ("--agents", "3", "--depth", "2", "--deltas", "8", "--delta-interval", "0.01")
MEDIUM_RUN = ("--agents", "3", "--depth", "2", "--deltas", "40", "--delta-interval", "0.03")
QUIET = ("--tokens-per-delta", "1", "--seed", "7")  # never reaches the budget warning


def seqs_of(frames: list[dict[str, Any]], rid: str) -> list[int]:
    return [f["seq"] for f in frames if "seq" in f and "ts" in f and f.get("request_id") == rid]


async def final_seq(lb: HAProxy, rid: str) -> int:
    """The request's last seq, as a fresh subscriber through the balancer is told."""
    async with WsClient(lb.ws_url) as probe:
        reply = await probe.request({"type": "subscribe", "request_id": rid}, "subscribed")
    assert reply["type"] == "subscribed", reply
    return int(reply["seq"])


async def wait_exit(proc: RelayProcess, timeout: float) -> int:
    """Wait for a process without blocking the event loop (clients keep reading)."""
    try:
        await eventually(lambda: not proc.alive(), timeout, "simulate to exit")
    except TimeoutError:
        raise AssertionError(f"simulate still running after {timeout}s:\n{proc.output()}") from None
    return proc.wait(1)


async def test_haproxy_serves_the_gateways(topology: Topology) -> None:
    status, body = topology.lb.get("/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = topology.lb.get("/")
    assert status == 200 and "<html" in body.lower()


async def test_events_reach_clients_through_the_balancer(topology: Topology) -> None:
    rid = str(uuid.uuid4())
    firehose = [WsClient(topology.lb.ws_url) for _ in range(3)]
    subscriber = WsClient(topology.lb.ws_url)
    async with contextlib.AsyncExitStack() as stack:
        for client in [*firehose, subscriber]:
            await stack.enter_async_context(client)
        for client in firehose:
            assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
        reply = await subscriber.request({"type": "subscribe", "request_id": rid}, "subscribed")
        assert reply["type"] == "subscribed"
        # leastconn spread the four sockets over the three gateways.
        spread = [topology.connections(n) for n in GATEWAYS]
        assert sum(spread) == 4 and min(spread) >= 1, spread

        sim = topology.simulate(rid, *SHORT_RUN, *QUIET)
        assert await wait_exit(sim, 60) == 0, sim.output()
        last = await final_seq(topology.lb, rid)
        assert last > 0
        expected = list(range(1, last + 1))
        for client in [*firehose, subscriber]:
            await client.wait_for(lambda c: len(seqs_of(c.frames, rid)) >= last, 15)
            assert seqs_of(client.frames, rid) == expected
        types = {f["type"] for f in subscriber.events(rid)}
        assert {"agent_spawned", "agent_text_delta", "agent_completed"} <= types


@pytest.mark.parametrize("via", ["websocket", "rest"])
async def test_cancel_through_the_balancer_stops_the_simulation(
    topology: Topology, via: str
) -> None:
    rid = str(uuid.uuid4())
    async with WsClient(topology.lb.ws_url + f"?request_id={rid}&after_seq=0") as client:
        sim = topology.simulate(rid, *LONG_RUN, *QUIET)
        await client.wait_for(lambda c: len(c.of_type("agent_text_delta")) >= 5, 30)
        if via == "websocket":
            ack = await client.request({"type": "cancel_agent", "agent_id": rid}, "ack")
        else:
            status, ack = topology.lb.post(f"/api/v1/agents/{rid}/cancel", {})
            assert status == 202, ack
        assert ack["type"] == "ack" and ack["agent_id"] == rid, ack

        await client.wait_for(lambda c: bool(c.of_type("agent_cancelled")), 15)
        code = await wait_exit(sim, 20)
        assert code == 0, sim.output()
        last = await final_seq(topology.lb, rid)
        await client.wait_for(lambda c: len(seqs_of(c.frames, rid)) >= last, 10)
        events = client.events(rid)
        assert seqs_of(client.frames, rid) == list(range(1, last + 1))
        spawned = {f["agent_id"] for f in events if f["type"] == "agent_spawned"}
        finished = {
            f["agent_id"]
            for f in events
            if f["type"] in ("agent_completed", "agent_failed", "agent_cancelled")
        }
        cancelled = {f["agent_id"] for f in events if f["type"] == "agent_cancelled"}
        assert cancelled, "no agent_cancelled event"
        assert spawned <= finished, "an agent was left running"
        # The run was cut short: nowhere near 400 deltas per agent were sent.
        assert len(client.of_type("agent_text_delta")) < 400


class ResumingClient:
    """Subscribes through the balancer and, when its socket drops, reconnects and
    resumes with ``after_seq`` = the last seq it saw (and the epoch it was told),
    the way PROTOCOL.md tells clients to."""

    def __init__(self, url: str, request_id: str) -> None:
        self.url = url
        self.rid = request_id
        self.frames: list[dict[str, Any]] = []
        self.controls: list[dict[str, Any]] = []
        self.epoch: str | None = None
        self.connects = 0
        self.drops = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames]

    @property
    def last(self) -> int:
        return self.frames[-1]["seq"] if self.frames else 0

    def resume_url(self) -> str:
        """Subscribe at connect time, so no event reaches the socket before the resume
        point is known (a first-frame ``subscribe`` would race the firehose)."""
        query = {"request_id": self.rid, "after_seq": str(self.last)}
        if self.epoch is not None:
            query["epoch"] = self.epoch
        return f"{self.url}?{urllib.parse.urlencode(query)}"

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                async with websockets.connect(
                    self.resume_url(), max_size=None, open_timeout=5
                ) as ws:
                    self.connects += 1
                    async for message in ws:
                        self.receive(json.loads(message))
            except (OSError, TimeoutError, websockets.WebSocketException):
                pass
            if not self.stop.is_set():
                self.drops += 1
                await asyncio.sleep(0.1)  # reconnect backoff

    def receive(self, frame: dict[str, Any]) -> None:
        if "seq" in frame and "ts" in frame and frame.get("request_id") == self.rid:
            self.frames.append(frame)
            return
        self.controls.append(frame)
        if frame.get("type") == "subscribed" and frame.get("epoch"):
            self.epoch = frame["epoch"]


async def test_clients_of_a_killed_gateway_resume_through_the_balancer(
    topology: Topology,
) -> None:
    rid = str(uuid.uuid4())
    clients = [ResumingClient(topology.lb.ws_url, rid) for _ in range(6)]
    try:
        for client in clients:
            client.start()
        await eventually(
            lambda: sum(topology.connections(n) for n in GATEWAYS) == len(clients),
            10,
            "every client connected",
        )
        sim = topology.simulate(rid, *MEDIUM_RUN, *QUIET)
        await eventually(lambda: all(c.last >= 20 for c in clients), 30, "20 events each")
        assert sim.alive(), "the run ended before the kill; make it longer"

        victim = max(GATEWAYS, key=topology.connections)
        on_victim = topology.connections(victim)
        assert on_victim >= 1
        seen_at_kill = max(c.last for c in clients)
        topology.gateways[victim].stop(signal.SIGKILL)

        assert await wait_exit(sim, 60) == 0, sim.output()
        last = await final_seq(topology.lb, rid)
        assert last > seen_at_kill, "no event was published after the kill"
        await eventually(
            lambda: all(c.last >= last for c in clients), 20, "every client at the last seq"
        )
    finally:
        for client in clients:
            await client.close()

    expected = list(range(1, last + 1))
    for client in clients:
        assert client.seqs == expected, (
            f"duplicates or gaps: {len(client.seqs)} events, expected {last}"
        )
        assert not [c for c in client.controls if c.get("type") == "resync_required"]
    resumed = [c for c in clients if c.connects > 1]
    assert len(resumed) >= on_victim, [(c.connects, c.drops) for c in clients]
