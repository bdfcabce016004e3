"""The simulated orchestrator on fakeredis: tree shape, budget, cancels, determinism."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import pytest

from relay.config import CancelConfig, GlobalConfig
from relay.orchestrator.cancel import request_cancel
from relay.orchestrator.connect import RelayConnection, connect
from relay.tools.simplan import build_plan
from relay.tools.simulate import SimOptions, SimulationResult, simulate
from relay.wire.answers import NoPendingDecision, answer_budget
from relay.wire.events import parse_event

WITH_REQUEST_ID = {
    "budget_update", "budget_warning", "budget_exhausted", "synthesis_started", "budget_decision",
}  # fmt: skip
TERMINAL = {"agent_completed", "agent_cancelled"}


@pytest.fixture
async def orchestrator(fake_redis: fakeredis.FakeAsyncRedis) -> AsyncIterator[RelayConnection]:
    config = GlobalConfig(cancel=CancelConfig(poll_interval=0.1))
    async with connect(config, redis=fake_redis) as rc:
        yield rc


async def history(client: RelayConnection, rid: str) -> list[dict[str, Any]]:
    entries: Any = await client.redis.xrange(client.keys.request(rid).history)
    return [json.loads(fields[b"f"]) for _, fields in entries]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def answer_when_pending(client: RelayConnection, rid: str, decision: str) -> None:
    """Answer the request's budget pause as soon as it opens."""
    while True:
        try:
            await answer_budget(client.redis, client.keys, rid, decision)  # type: ignore[arg-type]
            return
        except NoPendingDecision:
            await asyncio.sleep(0.005)


def check_well_formed(frames: list[dict[str, Any]], max_depth: int) -> None:
    """Every event validates; parents spawn first; deltas carry updates; every agent ends once."""
    spawned: dict[str, dict[str, Any]] = {}
    ended: dict[str, str] = {}
    for i, frame in enumerate(frames):
        assert frame["seq"] == i + 1
        body = {k: v for k, v in frame.items() if k not in ("seq", "ts")}
        if frame["type"] not in WITH_REQUEST_ID:
            del body["request_id"]
        parse_event(body)
        agent: str | None = frame.get("agent_id")
        if frame["type"] == "agent_spawned":
            assert agent is not None
            parent = frame["parent_id"]
            if parent is None:
                assert frame["depth"] == 0 and not spawned, "exactly one root, spawned first"
            else:
                assert parent in spawned and parent not in ended, "parent spawns before child"
                assert frame["depth"] == spawned[parent]["depth"] + 1 <= max_depth
            assert 0 <= frame["index"] < frame["total"]
            spawned[agent] = frame
        elif agent is not None:
            assert agent in spawned and agent not in ended, f"{frame['type']} of a finished agent"
            if frame["type"] in TERMINAL:
                ended[agent] = frame["type"]
        if frame["type"] == "agent_text_delta":
            # Deltas are batched: the batch's budget_update follows its last
            # event (the batch may end with a memory the agent created).
            after = next(f for f in frames[i + 1 :] if f["type"] != "agent_text_delta")
            assert after["type"] in ("budget_update", "memory_created"), after
            if after["type"] == "memory_created":
                j = frames.index(after)
                assert frames[j + 1]["type"] == "budget_update", frames[j + 1]
    assert set(ended) == set(spawned), "every spawned agent ends completed or cancelled"


async def run(
    client: RelayConnection,
    options: SimOptions,
    decision: str | None = "continue",
) -> tuple[SimulationResult, list[dict[str, Any]]]:
    rid = options.request_id
    assert rid is not None
    answer = asyncio.create_task(answer_when_pending(client, rid, decision)) if decision else None
    try:
        result = await simulate(client, options)
    finally:
        if answer is not None:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
    return result, await history(client, rid)


def options(**kw: Any) -> SimOptions:
    base: dict[str, Any] = {
        "request_id": str(uuid.uuid4()), "agents": 6, "depth": 3, "deltas": 6,
        "delta_interval": 0.0, "seed": 7, "decision_timeout": 5.0,
    }  # fmt: skip
    return SimOptions(**{**base, **kw})


async def test_a_full_run_publishes_a_well_formed_tree(orchestrator: Any) -> None:
    client = orchestrator
    result, frames = await run(client, options())
    check_well_formed(frames, max_depth=3)
    kinds = [f["type"] for f in frames]
    assert kinds.count("budget_warning") == 1
    assert kinds[kinds.index("budget_warning") + 1] == "budget_decision"
    assert kinds.count("synthesis_started") == 1
    assert kinds[-1] == "agent_completed" and frames[-1]["agent_id"] == frames[0]["agent_id"]
    assert result.outcome == "completed" and result.events_published == len(frames)
    assert result.agents_spawned == result.agents_completed == 7
    assert result.decision is not None and result.decision.decided_by == "client"
    updates = [f for f in frames if f["type"] == "budget_update"]
    assert all(isinstance(u["percentage"], float) for u in updates)
    assert updates[-1]["tokens_used"] == result.tokens_used
    assert kinds.count("agent_text_delta") == 7 * 6
    assert 1 <= len(updates) <= 7 * 6, "one update per batch of deltas"


async def test_the_same_seed_and_request_give_the_same_run(
    orchestrator: Any, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    client = orchestrator
    opts = options(agents=8, seed=42)
    _, first = await run(client, opts)
    await fake_redis.flushall()
    _, second = await run(client, opts)

    # Timing, and the shared budget drawn by interleaved agents, may differ.
    varying = {"seq", "ts", "duration_ms", "tokens_used", "percentage"}
    # How deltas fall into batches depends on timing too, so the batches'
    # budget updates are left out.
    first = [f for f in first if f["type"] != "budget_update"]
    second = [f for f in second if f["type"] != "budget_update"]

    def per_agent(frames: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
        # Parallel agents may interleave differently; each agent's own story may not.
        out: dict[str, list[tuple[Any, ...]]] = {}
        for f in frames:
            key = f.get("agent_id") or "request"
            kept = sorted((k, str(v)) for k, v in f.items() if k not in varying)
            out.setdefault(key, []).append(tuple(kept))
        return out

    assert per_agent(first) == per_agent(second)
    plan_a = build_plan(opts.request_id or "", agents=8, max_depth=3, deltas=6,
                        tokens_per_delta=100, seed=42)  # fmt: skip
    plan_b = build_plan(opts.request_id or "", agents=8, max_depth=3, deltas=6,
                        tokens_per_delta=100, seed=43)  # fmt: skip
    assert [a.task for a in plan_a.walk()] != [a.task for a in plan_b.walk()]


async def test_cancelling_an_agent_stops_only_its_subtree(orchestrator: Any) -> None:
    client = orchestrator
    opts = options(agents=8, seed=42, delta_interval=0.01, budget=10_000_000)
    plan = build_plan(opts.request_id or "", agents=8, max_depth=3, deltas=6, tokens_per_delta=1,
                      seed=42)  # fmt: skip
    target = next(a for a in plan.walk() if a.depth == 1 and a.batches)
    subtree = {a.agent_id for a in target.walk()}
    child = target.batches[0].agents[0].agent_id
    task = asyncio.create_task(run(client, opts, decision=None))

    async def child_spawned() -> bool:
        return any(f.get("agent_id") == child for f in await history(client, opts.request_id or ""))

    await eventually(child_spawned)
    await request_cancel(client.redis, client.keys, target.agent_id, ttl=60)
    result, frames = await task
    check_well_formed(frames, max_depth=3)
    ends = {f["agent_id"]: f for f in frames if f["type"] in TERMINAL}
    cancelled = {a for a, f in ends.items() if f["type"] == "agent_cancelled"}
    assert target.agent_id in cancelled and child in cancelled
    assert cancelled <= subtree
    assert all(f["type"] == "agent_completed" for a, f in ends.items() if a not in subtree)
    assert result.outcome == "completed"


async def test_cancelling_the_request_cancels_every_running_agent(orchestrator: Any) -> None:
    client = orchestrator
    opts = options(delta_interval=0.01, budget=10_000_000)
    rid = opts.request_id or ""
    task = asyncio.create_task(run(client, opts, decision=None))

    async def streaming() -> bool:
        return sum(f["type"] == "agent_text_delta" for f in await history(client, rid)) >= 5  # type: ignore[no-any-return]

    await eventually(streaming)
    await request_cancel(client.redis, client.keys, rid, ttl=60)
    result, frames = await task
    check_well_formed(frames, max_depth=3)
    assert result.outcome == "cancelled"
    root = frames[0]["agent_id"]
    assert frames[-1] == {**frames[-1], "type": "agent_cancelled", "agent_id": root}


async def test_a_cancel_written_before_the_run_ends_it_at_once(orchestrator: Any) -> None:
    client = orchestrator
    opts = options()
    await request_cancel(client.redis, client.keys, opts.request_id or "", ttl=60)
    result, frames = await run(client, opts, decision=None)
    assert [f["type"] for f in frames] == ["agent_spawned", "agent_cancelled"]
    assert result.outcome == "cancelled" and result.tokens_used == 0


async def test_stop_at_the_warning_stops_gracefully(orchestrator: Any) -> None:
    client = orchestrator
    result, frames = await run(client, options(), decision="stop")
    check_well_formed(frames, max_depth=3)
    decision = next(f for f in frames if f["type"] == "budget_decision")
    assert (decision["decision"], decision["decided_by"]) == ("stop", "client")
    assert result.outcome == "stopped"
    after = frames[frames.index(decision) + 1 :]
    assert "agent_spawned" not in {f["type"] for f in after}, "nothing new starts after stop"
    root_end = frames[-1]
    assert root_end["type"] == "agent_completed" and root_end["agent_id"] == frames[0]["agent_id"]


async def test_timeout_applies_the_default_decision(orchestrator: Any) -> None:
    client = orchestrator
    result, frames = await run(client, options(decision_timeout=0.2), decision=None)
    decision = next(f for f in frames if f["type"] == "budget_decision")
    assert (decision["decision"], decision["decided_by"]) == ("stop", "timeout")
    assert result.outcome == "stopped"


async def test_exhaustion_reports_completed_and_incomplete_agents(orchestrator: Any) -> None:
    client = orchestrator
    # One delta costs more than the whole budget: straight past 100%, no warning.
    opts = options(budget=10_000, tokens_per_delta=20_000)
    result, frames = await run(client, opts, decision=None)
    check_well_formed(frames, max_depth=3)
    kinds = [f["type"] for f in frames]
    assert "budget_warning" not in kinds and kinds.count("budget_exhausted") == 1
    exhausted = frames[kinds.index("budget_exhausted")]
    spawned = {f["agent_id"] for f in frames if f["type"] == "agent_spawned" and f["parent_id"]}
    assert set(exhausted["completed_agents"]) | set(exhausted["incomplete_agents"]) == spawned
    assert result.outcome == "exhausted"


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="depth"):
        SimOptions(depth=4)
    with pytest.raises(ValueError, match="budget"):
        SimOptions(budget=9_999)
    with pytest.raises(ValueError, match="agents"):
        SimOptions(agents=-1)
