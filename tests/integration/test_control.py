"""Cancels and budget decisions across real processes.

An orchestrator (``relay simulate``), two gateways and WebSocket clients, all
on one redis-server: control messages travel client -> gateway -> Redis ->
orchestrator, never through the gateway that serves the orchestrator's viewers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.tools.simplan import build_plan
from relay.wire.keys import Keys
from tests.support import Gateway, RedisServer, RelayProcess, WsClient, ws_clients

StartGateway = Callable[..., Gateway]
# Long enough to act mid-stream, short enough to finish in seconds.
STREAM = ["--deltas", "30", "--delta-interval", "0.05"]
NO_WARNING = ["--budget", "100000000", "--tokens-per-delta", "10"]


class Orchestrators:
    """Starts ``relay simulate`` processes against the test's Redis; stops them all."""

    def __init__(self, redis: RedisServer, tmp_path: Path) -> None:
        self.redis = redis
        self.tmp_path = tmp_path
        self.started: list[RelayProcess] = []

    def start(self, rid: str, *args: str, env: dict[str, str] | None = None) -> RelayProcess:
        log = self.tmp_path / f"simulate-{len(self.started)}.log"
        proc = RelayProcess(
            ["simulate", "--request-id", rid, "--seed", "42", *args],
            {"RELAY_REDIS_URL": self.redis.url, **(env or {})},
            log,
        )
        self.started.append(proc)
        return proc.start()


@pytest.fixture
def orchestrators(redis_server: RedisServer, tmp_path: Path) -> Iterator[Orchestrators]:
    orch = Orchestrators(redis_server, tmp_path)
    yield orch
    for proc in orch.started:
        proc.stop(signal.SIGKILL)


async def finished(proc: RelayProcess, timeout: float = 60.0) -> str:
    """Wait for the process to exit 0; return its output."""
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"simulate still running:\n{proc.output()}")
        await asyncio.sleep(0.05)
    assert proc.wait(1) == 0, proc.output()
    return proc.output()


def outcome(output: str) -> str:
    line = [ln for ln in output.splitlines() if ln.startswith("request ") and ":" in ln][-1]
    return line.split(": ", 1)[1].split(",", 1)[0]


def events(client: WsClient, rid: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [f for f in client.events(rid) if kind is None or f["type"] == kind]


def has(kind: str, rid: str, **fields: Any) -> Callable[[WsClient], bool]:
    return lambda c: any(
        all(f.get(k) == v for k, v in fields.items()) for f in events(c, rid, kind)
    )


async def subscribe(client: WsClient, rid: str) -> None:
    reply = await client.request({"type": "subscribe", "request_id": rid}, "subscribed")
    assert reply["type"] == "subscribed", reply


def endings(client: WsClient, rid: str) -> dict[str, str]:
    return {
        f["agent_id"]: f["type"]
        for f in events(client, rid)
        if f["type"] in ("agent_completed", "agent_cancelled")
    }


def assert_every_agent_ended(client: WsClient, rid: str) -> None:
    spawned = {f["agent_id"] for f in events(client, rid, "agent_spawned")}
    assert set(endings(client, rid)) == spawned
    # An agent's terminal event is its last one: nothing streams after a cancel.
    last: dict[str, str] = {}
    for f in events(client, rid):
        if "agent_id" in f:
            last[f["agent_id"]] = f["type"]
    assert all(kind in ("agent_completed", "agent_cancelled") for kind in last.values()), last


# ---------------------------------------------------------------- cancellation


async def test_cancel_of_one_agent_from_another_gateway_stops_only_its_subtree(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw1, gw2 = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    plan = build_plan(rid, agents=8, max_depth=3, deltas=30, tokens_per_delta=10, seed=42)
    target = next(a for a in plan.walk() if a.depth == 1 and a.batches)
    assert sum(len(b.agents) for b in plan.batches) >= 2, "the target needs siblings"
    subtree = {a.agent_id for a in target.walk()}
    first_child = target.batches[0].agents[0].agent_id
    async with ws_clients([gw1.ws_url, gw2.ws_url]) as (viewer, controller):
        await subscribe(viewer, rid)
        proc = orchestrators.start(rid, "--agents", "8", "--depth", "3", *STREAM, *NO_WARNING)
        # Mid-stream: the target has children running and is still streaming.
        await viewer.wait_for(has("agent_text_delta", rid, agent_id=first_child), 30)
        reply = await controller.request(
            {"type": "cancel_agent", "agent_id": target.agent_id, "command_id": 1}, "ack"
        )
        assert reply == {"type": "ack", "command": "cancel_agent", "agent_id": target.agent_id,
                         "already_cancelled": False, "command_id": 1}  # fmt: skip
        assert outcome(await finished(proc)) == "completed"
        await viewer.wait_for(has("agent_completed", rid, agent_id=plan.agent_id), 10)
    ends = endings(viewer, rid)
    cancelled = {a for a, kind in ends.items() if kind == "agent_cancelled"}
    spawned_below = subtree & set(ends)
    assert cancelled == spawned_below, "the target and every spawned descendant, nothing else"
    assert {target.agent_id, first_child} <= cancelled
    assert all(kind == "agent_completed" for a, kind in ends.items() if a not in subtree)
    assert_every_agent_ended(viewer, rid)


async def test_cancel_of_the_request_id_stops_every_agent(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw1, gw2 = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    async with ws_clients([gw1.ws_url, gw2.ws_url]) as (viewer, controller):
        await subscribe(viewer, rid)
        proc = orchestrators.start(rid, "--agents", "6", *STREAM, *NO_WARNING)
        await viewer.wait_for(lambda c: len(events(c, rid, "agent_spawned")) >= 3, 30)
        reply = await controller.request({"type": "cancel_agent", "agent_id": rid}, "ack")
        assert reply["type"] == "ack"
        assert outcome(await finished(proc)) == "cancelled"
        root = events(viewer, rid, "agent_spawned")[0]["agent_id"]
        await viewer.wait_for(has("agent_cancelled", rid, agent_id=root), 10)
    assert "agent_cancelled" in endings(viewer, rid).values()
    assert_every_agent_ended(viewer, rid)
    assert events(viewer, rid)[-1]["agent_id"] == root, "the root announces last"


async def test_cancel_written_before_the_orchestrator_starts_ends_the_run_at_once(
    start_gateway: StartGateway, orchestrators: Orchestrators, redis_server: RedisServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    gw = start_gateway()
    rid = str(uuid.uuid4())
    cancel = RelayProcess(["cancel", rid], {"RELAY_REDIS_URL": redis_server.url},
                          tmp_path / "cancel.log").start()  # fmt: skip
    assert cancel.wait(30) == 0, cancel.output()
    cancel.stop()
    async with WsClient(gw.ws_url) as viewer:
        await subscribe(viewer, rid)
        proc = orchestrators.start(rid, *STREAM, *NO_WARNING)
        assert outcome(await finished(proc, 30)) == "cancelled"
        await viewer.wait_for(lambda c: len(events(c, rid)) >= 2, 10)
    assert [f["type"] for f in events(viewer, rid)] == ["agent_spawned", "agent_cancelled"]


async def test_cancel_while_the_orchestrator_is_down_is_honoured_when_it_comes_back(
    start_gateway: StartGateway, orchestrators: Orchestrators, redis_server: RedisServer
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    args = ["--agents", "4", *STREAM, *NO_WARNING]
    async with WsClient(gw.ws_url) as viewer:
        await subscribe(viewer, rid)
        first = orchestrators.start(rid, *args)
        await viewer.wait_for(lambda c: len(events(c, rid, "agent_text_delta")) >= 5, 30)
        first.stop(signal.SIGKILL)  # crashed: it can announce nothing
        status, body = gw.post(f"/api/v1/agents/{rid}/cancel", {})
        assert (status, body["type"]) == (202, "ack")
        # What the killed process published may still be on its way to the
        # viewer: wait for its last seq before counting.
        last = int(redis_server.command("GET", Keys().request(rid).seq) or 0)
        await viewer.wait_for(lambda c: any(f.get("seq", 0) >= last for f in events(c, rid)), 10)
        seen = len(events(viewer, rid))
        again = orchestrators.start(rid, *args)
        assert outcome(await finished(again, 30)) == "cancelled"
        await viewer.wait_for(lambda c: has("agent_cancelled", rid)(c), 10)
    after = [f["type"] for f in events(viewer, rid)[seen:]]
    assert after == ["agent_spawned", "agent_cancelled"], "re-registered, cancelled, no deltas"


async def test_orchestrator_that_misses_the_nudge_still_stops(
    start_gateway: StartGateway, orchestrators: Orchestrators, redis_server: RedisServer
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    async with WsClient(gw.ws_url) as viewer:
        await subscribe(viewer, rid)
        proc = orchestrators.start(
            rid, "--agents", "4", *STREAM, *NO_WARNING, env={"RELAY_CANCEL_POLL_INTERVAL": "0.3"}
        )
        await viewer.wait_for(lambda c: len(events(c, rid, "agent_text_delta")) >= 3, 30)
        # The tombstone without its PUBLISH: only the orchestrator's poll can find it.
        payload = json.dumps({"target_id": rid, "reason": "found by poll", "ts": 0})
        redis_server.command("SET", Keys().cancel(rid), payload, "EX", "60")
        assert outcome(await finished(proc, 30)) == "cancelled"
    assert has("agent_cancelled", rid, reason="found by poll")(viewer)


# ---------------------------------------------------------------- budget decisions

# 4 agents x 30 deltas, sized to use ~90% of the budget: one warning, then a pause.
PAUSING = ["--agents", "3", "--budget", "10000", *STREAM]


async def test_concurrent_answers_on_two_gateways_exactly_one_wins(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw1, gw2 = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    async with ws_clients([gw1.ws_url, gw2.ws_url]) as (a, b):
        await subscribe(a, rid)
        await subscribe(b, rid)
        proc = orchestrators.start(rid, *PAUSING, "--decision-timeout", "30")
        for client in (a, b):
            await client.wait_for(has("budget_warning", rid), 30)
        answer = {"type": "budget_continue", "request_id": rid}
        replies = await asyncio.gather(a.request(answer, "ack"), b.request(answer, "ack"))
        kinds = sorted(r["type"] for r in replies)
        assert kinds == ["ack", "error"], replies
        assert next(r for r in replies if r["type"] == "error")["code"] == "no_pending_decision"
        await a.wait_for(has("budget_decision", rid, decision="continue", decided_by="client"), 10)
        assert outcome(await finished(proc)) == "completed"
    assert len(events(a, rid, "budget_warning")) == 1
    assert len(events(a, rid, "budget_decision")) == 1


async def test_timeout_applies_the_default_decision(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    async with WsClient(gw.ws_url) as viewer:
        await subscribe(viewer, rid)
        proc = orchestrators.start(rid, *PAUSING, "--decision-timeout", "0.5")
        assert outcome(await finished(proc)) == "stopped"
        await viewer.wait_for(has("budget_decision", rid), 10)
    (decision,) = events(viewer, rid, "budget_decision")
    assert (decision["decision"], decision["decided_by"]) == ("stop", "timeout")
    assert_every_agent_ended(viewer, rid)


async def test_a_stale_answer_does_not_leak_into_a_later_pause(
    start_gateway: StartGateway, orchestrators: Orchestrators, redis_server: RedisServer
) -> None:
    gw1, gw2 = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    async with ws_clients([gw1.ws_url, gw2.ws_url]) as (a, b):
        stale = await a.request({"type": "budget_continue", "request_id": rid}, "ack")
        assert (stale["type"], stale["code"]) == ("error", "no_pending_decision")
        await subscribe(a, rid)
        proc = orchestrators.start(rid, *PAUSING, "--decision-timeout", "30")
        await a.wait_for(has("budget_warning", rid), 30)
        pending = redis_server.command("GET", Keys().request(rid).pending)
        assert pending.strip(), "the pause still waits: the stale answer was not kept"
        assert not events(a, rid, "budget_decision")
        reply = await b.request({"type": "budget_stop", "request_id": rid}, "ack")
        assert reply["type"] == "ack" and reply["pause_id"] == json.loads(pending)["pause_id"]
        await a.wait_for(has("budget_decision", rid, decision="stop", decided_by="client"), 10)
        assert outcome(await finished(proc)) == "stopped"


async def test_a_late_subscriber_gets_budget_pending_and_can_answer(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw1, gw2 = start_gateway(), start_gateway()
    rid = str(uuid.uuid4())
    async with WsClient(gw1.ws_url) as early:
        await subscribe(early, rid)
        proc = orchestrators.start(rid, *PAUSING, "--decision-timeout", "30")
        await early.wait_for(has("budget_warning", rid), 30)
        async with WsClient(gw2.ws_url) as late:
            await subscribe(late, rid)
            await late.wait_for(lambda c: bool(c.of_type("budget_pending")), 10)
            (pending,) = late.of_type("budget_pending")
            assert pending["request_id"] == rid and pending["budget_total"] == 10_000
            reply = await late.request({"type": "budget_stop", "request_id": rid}, "ack")
            assert reply["type"] == "ack" and reply["pause_id"] == pending["pause_id"]
            await late.wait_for(has("budget_decision", rid, decision="stop"), 10)
        assert outcome(await finished(proc)) == "stopped"


async def test_rest_control_routes(
    start_gateway: StartGateway, orchestrators: Orchestrators
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    status, body = gw.post(f"/api/v1/agents/{uuid.uuid4()}/cancel", {})
    assert (status, body["type"]) == (202, "ack")
    status, body = gw.post(f"/api/v1/requests/{rid}/budget", {"decision": "continue"})
    assert (status, body["code"]) == (409, "no_pending_decision")
    status, body = gw.post(f"/api/v1/requests/{rid}/budget", {"decision": "maybe"})
    assert status == 400 and body["type"] == "error"
    async with WsClient(gw.ws_url) as viewer:
        await subscribe(viewer, rid)
        proc = orchestrators.start(rid, *PAUSING, "--decision-timeout", "30")
        await viewer.wait_for(has("budget_warning", rid), 30)
        status, body = gw.post(f"/api/v1/requests/{rid}/budget", {"decision": "continue"})
        assert (status, body["type"], body["decision"]) == (202, "ack", "continue")
        status, _ = gw.post(f"/api/v1/requests/{rid}/budget", {"decision": "stop"})
        assert status == 409
        assert outcome(await finished(proc)) == "completed"
    assert has("budget_decision", rid, decision="continue", decided_by="client")(viewer)


# ---------------------------------------------------------------- the terminal console


async def test_tail_draws_the_tree_of_a_simulated_run(
    start_gateway: StartGateway, orchestrators: Orchestrators, tmp_path: Path
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    tail = RelayProcess(
        ["tail", gw.ws_url, "--request-id", rid, "--no-input", "--exit-after", "30"], {},
        tmp_path / "tail.log",
    ).start()  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while "subscribed to" not in tail.output():
            assert time.monotonic() < deadline, tail.output()
            await asyncio.sleep(0.05)
        proc = orchestrators.start(rid, "--agents", "5", "--budget", "10000",
                                   "--deltas", "6", "--delta-interval", "0.01",
                                   "--decision-timeout", "0.2")  # fmt: skip
        assert outcome(await finished(proc)) == "stopped"
        deadline = time.monotonic() + 15
        while "budget decision: stop (by timeout)" not in tail.output():
            assert time.monotonic() < deadline, tail.output()
            await asyncio.sleep(0.05)
    finally:
        assert tail.stop(signal.SIGINT) == 0
    out = tail.output()
    assert "└── " in out and "[tokens: " in out and "⚠ budget warning" in out, out
