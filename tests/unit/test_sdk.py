"""The orchestrator SDK on fakeredis: the agent protocol, cancels, errors, budget pauses."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

import relay
from relay.config import BudgetConfig, CancelConfig, GlobalConfig, SdkConfig
from relay.orchestrator.connect import RelayConnection
from relay.wire.answers import NoPendingDecision

POLL = 0.05


def make_config(**sdk: Any) -> GlobalConfig:
    return GlobalConfig(
        cancel=CancelConfig(poll_interval=POLL),
        sdk=SdkConfig(**sdk),
        budget=BudgetConfig(decision_timeout_seconds=5.0),
    )


@pytest.fixture
async def rc(fake_redis: fakeredis.FakeAsyncRedis) -> AsyncIterator[RelayConnection]:
    async with relay.connect(make_config(), redis=fake_redis) as conn:
        yield conn


async def history(rc: RelayConnection, rid: str) -> list[dict[str, Any]]:
    entries: Any = await rc.redis.xrange(rc.keys.request(rid).history)
    return [json.loads(fields[b"f"]) for _, fields in entries]


def kinds(frames: list[dict[str, Any]], agent: str | None = None) -> list[str]:
    return [f["type"] for f in frames if agent is None or f.get("agent_id") == agent]


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    # Polls state the code under test changes; the bound only ends a hung test.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def test_an_agent_tree_publishes_spawns_text_and_completions(rc: RelayConnection) -> None:
    async with rc.request(budget=50_000) as req, req.agent("Research prices") as root:
        await root.text("Prices ", tokens=2)
        async with root.child("Collect sources", index=0, total=1) as kid:
            await kid.text("three sources", tokens=5)
            await kid.memory("Sources disagree")
        await root.text("rose.", tokens=3)
        root.result = "Prices rose"
    frames = await history(rc, req.id)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert kinds(frames, root.id) == [
        "agent_spawned", "agent_text_delta", "agent_text_delta", "agent_completed",
    ]  # fmt: skip
    assert kinds(frames, kid.id) == [
        "agent_spawned", "agent_text_delta", "memory_created", "agent_completed",
    ]  # fmt: skip
    spawn = next(f for f in frames if f["type"] == "agent_spawned" and f["agent_id"] == kid.id)
    assert (spawn["parent_id"], spawn["depth"], spawn["task_description"]) == (
        root.id, 1, "Collect sources",
    )  # fmt: skip
    # The parent's text so far is published before its child appears.
    assert frames.index(spawn) > next(i for i, f in enumerate(frames) if f.get("text") == "Prices ")
    done = {f["agent_id"]: f for f in frames if f["type"] == "agent_completed"}
    assert done[root.id]["tokens_used"] == 5 and done[root.id]["result_summary"] == "Prices rose"
    assert done[kid.id]["tokens_used"] == 5 and done[kid.id]["result_summary"] == "three sources"
    assert all(isinstance(d["duration_ms"], int) for d in done.values())
    updates = [f for f in frames if f["type"] == "budget_update"]
    assert updates[-1]["tokens_used"] == 10 and await req.budget.used() == 10
    assert root.outcome == kid.outcome == "completed" and req.outcome == "completed"


async def test_an_exception_publishes_agent_failed_and_is_re_raised(rc: RelayConnection) -> None:
    async with rc.request() as req:
        with pytest.raises(KeyError, match="missing"):
            async with req.agent("Flaky") as agent:
                await agent.text("partial")
                raise KeyError("missing")
    frames = await history(rc, req.id)
    assert kinds(frames) == ["agent_spawned", "agent_text_delta", "agent_failed"]
    assert frames[-1]["error"] == "KeyError: 'missing'" and frames[-1]["will_retry"] is False
    assert agent.outcome == "failed"


async def test_a_cancel_interrupts_a_pending_await_and_the_caller_goes_on(
    rc: RelayConnection,
) -> None:
    seen: list[str] = []
    async with rc.request() as req, req.agent("Root") as root:
        started = asyncio.Event()

        async def sub() -> str:
            async with root.child("Blocked") as kid:
                started.set()
                try:
                    await asyncio.sleep(3600)  # an LLM call that never returns
                except asyncio.CancelledError:
                    seen.append("interrupted")
                    raise
                finally:
                    seen.append("finally")
            # The context swallowed its own cancellation: the code after it runs.
            seen.append("after")
            return kid.id

        task = asyncio.create_task(sub())
        await started.wait()
        await rc.cancel(task_agent_id(root, req), reason="too slow")
        # The bound only ends a hung test: the cancel itself must end the task.
        await finished(task)
        assert not task.cancelled()
        kid_id = task.result()
        await root.text("root goes on")
    assert seen == ["interrupted", "finally", "after"]
    frames = await history(rc, req.id)
    assert kinds(frames, kid_id) == ["agent_spawned", "agent_cancelled"]
    ended = frames[kinds(frames).index("agent_cancelled")]
    assert ended["reason"] == "too slow"
    assert kinds(frames, root.id)[-1] == "agent_completed"


async def finished(task: asyncio.Task[Any]) -> None:
    done, _ = await asyncio.wait({task}, timeout=10)
    if task not in done:
        task.cancel()
        await asyncio.wait({task})
        pytest.fail("the cancel did not interrupt the agent's pending await")


def task_agent_id(root: relay.Agent, req: relay.Request) -> str:
    """The id of ``root``'s only child that is still running."""
    (kid,) = [a for a in req.agents.values() if a.parent_id == root.id and a.outcome is None]
    return kid.id


async def test_a_cancel_of_an_ancestor_ends_nested_agents_children_first(
    rc: RelayConnection,
) -> None:
    after: list[str] = []

    async def run(req: relay.Request, ready: asyncio.Event) -> None:
        async with req.agent("Root") as root:
            async with root.child("Child") as child:
                async with child.child("Grandchild"):
                    ready.set()
                    await asyncio.Event().wait()
                after.append("grandchild block")  # never: the cancel goes on to child
            after.append("child block")  # never: the cancel goes on to root
        after.append("root block")
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    async with rc.request() as req:
        ready = asyncio.Event()
        task = asyncio.create_task(run(req, ready))
        await ready.wait()
        await rc.cancel(req.id, reason="user closed the tab")
        await finished(task)
        task.result()
    assert after == ["root block"]
    frames = await history(rc, req.id)
    ends = [f for f in frames if f["type"] == "agent_cancelled"]
    depth = {f["agent_id"]: f["depth"] for f in frames if f["type"] == "agent_spawned"}
    assert [depth[f["agent_id"]] for f in ends] == [2, 1, 0], "children before parents"
    assert {f["reason"] for f in ends} == {"user closed the tab"}
    assert req.outcome == "cancelled"


async def test_cancelling_the_task_from_outside_announces_and_propagates(
    rc: RelayConnection,
) -> None:
    async with rc.request() as req:
        ready = asyncio.Event()

        async def run() -> None:
            async with req.agent("Root"):
                ready.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(run())
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    frames = await history(rc, req.id)
    assert kinds(frames) == ["agent_spawned", "agent_cancelled"]
    assert frames[-1]["reason"].startswith("interrupted")


async def test_raise_if_cancelled_stops_a_loop_without_awaits(rc: RelayConnection) -> None:
    async with rc.request() as req:
        async with req.agent("Cruncher") as agent:
            agent.request.cancel_local("enough")
            rows = 0
            for _ in range(1000):
                agent.raise_if_cancelled()
                rows += 1
        assert rows == 0 and agent.outcome == "cancelled"
    assert kinds(await history(rc, req.id)) == ["agent_spawned", "agent_cancelled"]


async def test_a_tombstone_written_before_the_agent_cancels_it_at_its_first_await(
    rc: RelayConnection,
) -> None:
    aid = str(uuid.uuid4())
    await rc.cancel(aid, reason="cancelled early")
    reached: list[str] = []
    async with rc.request() as req, req.agent("Late", agent_id=aid) as agent:
        assert agent.is_cancelled and agent.cancelled_by == aid
        reached.append("body")
        await asyncio.sleep(3600)
        reached.append("never")
    assert reached == ["body"]
    frames = await history(rc, req.id)
    assert kinds(frames) == ["agent_spawned", "agent_cancelled"]
    assert frames[-1]["reason"] == "cancelled early"


async def test_await_cancelled_returns_the_reason(rc: RelayConnection) -> None:
    async with rc.request() as req:
        async with req.agent("Root") as root:
            waiter = asyncio.create_task(root.cancelled())
            await asyncio.sleep(0)
            assert not waiter.done()
            await root.cancel("stop it")
            # The cancel interrupts this await; the waiter sees the reason.
            await asyncio.sleep(3600)
        assert waiter.result() == "stop it"


async def test_single_token_deltas_are_batched_in_order(fake_redis: Any) -> None:
    async with (
        relay.connect(make_config(batch_max_events=100), redis=fake_redis) as rc,
        rc.request(budget=100_000) as req,
        req.agent("Streamer") as agent,
    ):
        for i in range(1000):
            await agent.text(f"{i},", tokens=1)
        batches = agent._box.batches
    frames = await history(rc, req.id)
    texts = [f["text"] for f in frames if f["type"] == "agent_text_delta"]
    assert texts == [f"{i}," for i in range(1000)]
    # No await suspends the producer until a batch is full: 10 batches of 100.
    assert batches <= 12, batches
    assert [f["tokens_used"] for f in frames if f["type"] == "budget_update"][-1] == 1000


async def test_batching_off_publishes_every_delta_on_its_own(fake_redis: Any) -> None:
    async with (
        relay.connect(make_config(batch_max_events=1), redis=fake_redis) as rc,
        rc.request(budget=100_000) as req,
        req.agent("Streamer") as agent,
    ):
        for i in range(50):
            await agent.text(f"{i},", tokens=1)
    frames = await history(rc, req.id)
    assert [f["text"] for f in frames if f["type"] == "agent_text_delta"] == [
        f"{i}," for i in range(50)
    ]
    # One publish per delta, each with the budget update of its one token.
    assert kinds(frames).count("budget_update") == 50


async def test_unbatched_agents_side_by_side_share_round_trips(fake_redis: Any) -> None:
    async with (
        relay.connect(make_config(batch_max_events=1), redis=fake_redis) as rc,
        rc.request(budget=100_000) as req,
    ):

        async def stream(i: int) -> None:
            async with req.agent(f"streamer {i}", index=i, total=10) as agent:
                for n in range(20):
                    await agent.text(f"{n},", tokens=1)

        await asyncio.gather(*(stream(i) for i in range(10)))
    calls = rc.client.calls
    # 10 agents x 20 deltas, each a budget add and a publish of its own ...
    assert calls.calls >= 400, calls.calls
    # ... but agents waiting on Redis at the same time share a pipeline.
    assert calls.pipelines * 4 < calls.calls, (calls.pipelines, calls.calls)
    frames = await history(rc, req.id)
    deltas = [f for f in frames if f["type"] == "agent_text_delta"]
    assert len(deltas) == 200
    by_agent: dict[str, list[str]] = {}
    for f in deltas:
        by_agent.setdefault(f["agent_id"], []).append(f["text"])
    assert len(by_agent) == 10
    assert all(texts == [f"{n}," for n in range(20)] for texts in by_agent.values())


async def test_the_outbox_is_bounded_and_blocks_the_producer() -> None:
    from relay.orchestrator.batch import Outbox
    from relay.wire.events import AgentTextDelta

    release = asyncio.Event()
    published: list[int] = []

    async def slow_publish(events: list[Any], tokens: int, spent_by: int) -> None:
        await release.wait()
        published.append(len(events))

    box = Outbox(slow_publish, window=0.0, max_events=4, name="bounded")
    aid = uuid.uuid4()
    producer = asyncio.create_task(
        _produce(box, [AgentTextDelta(agent_id=aid, text=str(i)) for i in range(20)])
    )
    await until(lambda: _true(box.pending == 8), "buffer and batch in flight full")
    await asyncio.sleep(0.01)
    assert not producer.done() and box.pending == 8, "4 in flight, 4 buffered, producer waits"
    release.set()
    await asyncio.wait_for(producer, 5)
    await box.close()
    assert sum(published) == 20 and max(published) <= 4


async def _produce(box: Any, events: list[Any]) -> None:
    for event in events:
        await box.add(event, 1)


async def _true(value: bool) -> bool:
    return value


async def test_a_failed_publish_is_raised_by_the_agent_not_dropped() -> None:
    from relay.orchestrator.batch import Outbox
    from relay.wire.events import AgentTextDelta

    async def failing(events: list[Any], tokens: int, spent_by: int) -> None:
        raise relay.PublishError("Redis is gone")

    box = Outbox(failing, window=0.0, max_events=8, name="failing")
    await box.add(AgentTextDelta(agent_id=uuid.uuid4(), text="x"))
    with pytest.raises(relay.PublishError, match="Redis is gone"):
        await box.flush()
    with pytest.raises(relay.PublishError):
        await box.add(AgentTextDelta(agent_id=uuid.uuid4(), text="y"))
    with pytest.raises(relay.PublishError):
        await box.close()


async def test_a_budget_pause_holds_text_until_continue(rc: RelayConnection) -> None:
    async with rc.request(budget=10_000) as req, req.agent("Spender") as agent:
        await agent.text("big", tokens=8_500)  # crosses the 80% warning
        await agent.flush()
        blocked = asyncio.create_task(agent.text("after", tokens=1))
        await until(lambda: _pending(rc, req.id), "the pause opened")
        await asyncio.sleep(0.02)
        assert not blocked.done(), "text waits while the pause is open"
        await rc.answer_budget(req.id, "continue")
        await asyncio.wait_for(blocked, 5)
    frames = await history(rc, req.id)
    order = kinds(frames)
    assert order.index("budget_warning") < order.index("budget_decision")
    after = next(i for i, f in enumerate(frames) if f.get("text") == "after")
    assert after > order.index("budget_decision")
    decision = frames[order.index("budget_decision")]
    assert (decision["decision"], decision["decided_by"]) == ("continue", "client")
    assert req.decision is not None and req.halted is None


async def _pending(rc: RelayConnection, rid: str) -> bool:
    return await rc.redis.exists(rc.keys.request(rid).pending) == 1


async def test_stop_at_the_warning_halts_sub_agents_and_the_root_synthesises(
    rc: RelayConnection,
) -> None:
    async with rc.request(budget=10_000) as req, req.agent("Root") as root:
        started = asyncio.Event()

        async def worker() -> None:
            async with root.child("Worker") as kid:
                await kid.text("costly", tokens=9_000)
                started.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(worker())
        await started.wait()
        await until(lambda: _pending(rc, req.id), "the pause opened")
        await rc.answer_budget(req.id, "stop")
        await asyncio.wait_for(task, 5)
        assert req.halted == "stopped at the budget warning by client"
    frames = await history(rc, req.id)
    order = kinds(frames)
    kid_end = frames[order.index("agent_cancelled")]
    assert kid_end["reason"] == "stopped at the budget warning by client"
    assert order[-2:] == ["synthesis_started", "agent_completed"]
    assert frames[-1]["result_summary"].startswith("Partial synthesis")
    assert req.outcome == "stopped"


async def test_answer_budget_is_exported_and_refuses_without_a_pause(rc: RelayConnection) -> None:
    rid = str(uuid.uuid4())
    with pytest.raises(NoPendingDecision):
        await relay.answer_budget(rc.redis, rc.keys, rid, "continue")


async def test_the_lease_hook_is_told_of_every_request(rc: RelayConnection) -> None:
    calls: list[tuple[str, str]] = []

    class Recorder:
        async def hold(self, request_id: str) -> None:
            calls.append(("hold", request_id))

        async def release(self, request_id: str) -> None:
            calls.append(("release", request_id))

    rc.lease = Recorder()
    async with rc.request() as req:
        assert calls == [("hold", req.id)]
    assert calls == [("hold", req.id), ("release", req.id)]


def test_ids_are_one_type_str() -> None:
    from relay.orchestrator.request import normalize_id

    upper = "3F0C2A6E-0D6B-4C1E-9E4B-8D6A1F2B3C4D"
    assert normalize_id(upper, "agent_id") == upper.lower()
    with pytest.raises(TypeError, match="agent_id: ids are str"):
        normalize_id(uuid.UUID(upper), "agent_id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_id: 'nope' is not a UUID"):
        normalize_id("nope", "request_id")


async def test_ids_taken_and_returned_as_str(rc: RelayConnection) -> None:
    rid = str(uuid.uuid4())
    async with rc.request(rid.upper()) as req, req.agent("Root") as root:
        assert isinstance(root.id, str) and root.lineage == (rid, root.id)
        assert root.ref.request_id == rid and root.ref.agent_id == root.id
    assert req.id == rid


def test_connect_applies_every_redis_setting_and_the_tenant() -> None:
    config = GlobalConfig.model_validate(
        {"redis": {"url": "redis://127.0.0.1:1/0", "socket_timeout": 0.25, "max_connections": 3}}
    )
    rc = relay.connect(config, tenant="acme")
    kwargs = rc.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.25 and kwargs["socket_connect_timeout"] == 0.25
    assert rc.redis.connection_pool.max_connections == 3
    assert rc.tenant == "acme" and rc.keys.tenant == "acme"
    assert relay.connect("redis://127.0.0.1:1/0").tenant == "default"
    with pytest.raises(relay.ConfigError, match=r"redis\.tenant"):
        relay.connect(config, tenant="no spaces")
    with pytest.raises(relay.ConfigError, match=r"redis\.url"):
        relay.connect("http://nope")


async def test_a_request_is_held_under_the_process_lease_while_it_runs(
    rc: RelayConnection,
) -> None:
    assert isinstance(rc.lease, relay.LeaseKeeper)
    async with rc.request() as req:
        assert req.id in rc.lease.held
        leases = rc.keys.request(req.id).lease
        assert await rc.redis.exists(leases)  # what a gateway's reaper looks at
    assert req.id not in rc.lease.held
