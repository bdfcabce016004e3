"""CancelRegistry/CancelToken and RequestBudget/answer_budget semantics on fakeredis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import fakeredis
import pytest

from relay.config import BudgetConfig
from relay.orchestrator.budget import (
    BudgetState,
    BudgetStatus,
    NoPendingDecision,
    PauseOutcome,
    RequestBudget,
    answer_budget,
)
from relay.orchestrator.cancel import CancelRegistry, CancelToken, request_cancel
from relay.wire.events import BudgetDecision, BudgetWarning
from relay.wire.keys import Keys

KEYS = Keys()


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


@pytest.fixture
async def registry(fake_redis: fakeredis.FakeAsyncRedis) -> AsyncIterator[CancelRegistry]:
    reg = CancelRegistry(fake_redis, KEYS, poll_interval=0.1)
    await reg.start()
    yield reg
    await reg.close()


async def cancelled_soon(token: CancelToken, timeout: float = 5.0) -> str:
    return await asyncio.wait_for(token.wait(), timeout)


async def settle(registry: CancelRegistry) -> None:
    """Give the registry a full poll round (a negative check needs one to be meaningful)."""
    await asyncio.sleep(registry.poll_interval * 3)


# ---------------------------------------------------------------- cancellation


async def test_cancelling_a_parent_cancels_descendants_never_the_parent_of_a_child(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a, b, a1, a1x = ids(5)
    root = await registry.token(rid)
    ta, tb = await root.child(a), await root.child(b)
    ta1 = await ta.child(a1)
    ta1x = await ta1.child(a1x)

    await request_cancel(fake_redis, KEYS, a1, ttl=60)
    assert await cancelled_soon(ta1x) == "cancelled by user"
    assert ta1.is_cancelled() and ta1x.cancelled_by == a1
    await settle(registry)
    assert not ta.is_cancelled() and not root.is_cancelled() and not tb.is_cancelled()

    await request_cancel(fake_redis, KEYS, a, ttl=60, reason="enough")
    assert await cancelled_soon(ta) == "enough"
    assert not tb.is_cancelled()


async def test_cancelling_the_request_id_cancels_everything(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a, b = ids(3)
    root = await registry.token(rid)
    ta = await root.child(a)
    tb = await (await root.child(b)).child(str(uuid.uuid4()))
    await request_cancel(fake_redis, KEYS, rid, ttl=60)
    for token in (root, ta, tb):
        await cancelled_soon(token)
        assert token.cancelled_by == rid


async def test_a_tombstone_written_before_registration_is_honoured_at_registration(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a = ids(2)
    await request_cancel(fake_redis, KEYS, a, ttl=60, reason="early")
    root = await registry.token(rid)
    token = await root.child(a)
    # No waiting: the registration itself read the tombstone.
    assert token.is_cancelled() and token.reason == "early"
    assert not root.is_cancelled()


async def test_a_child_created_after_its_ancestor_was_cancelled_starts_cancelled(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a, a1 = ids(3)
    ta = await (await registry.token(rid)).child(a)
    await request_cancel(fake_redis, KEYS, a, ttl=60)
    await cancelled_soon(ta)
    late = await ta.child(a1)
    assert late.is_cancelled() and late.cancelled_by == a


async def test_a_missed_nudge_is_caught_by_the_poll(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a = ids(2)
    token = await (await registry.token(rid)).child(a)
    # The tombstone alone, as if the PUBLISH had been lost.
    payload = json.dumps({"target_id": a, "reason": "polled", "ts": 0})
    await fake_redis.set(KEYS.cancel(a), payload, ex=60)
    assert await cancelled_soon(token, timeout=registry.poll_interval * 20) == "polled"


async def test_a_released_token_is_no_longer_reached(
    registry: CancelRegistry, fake_redis: fakeredis.FakeAsyncRedis
) -> None:
    rid, a = ids(2)
    token = await (await registry.token(rid)).child(a)
    token.release()
    await request_cancel(fake_redis, KEYS, rid, ttl=60)
    await settle(registry)
    assert not token.is_cancelled()


async def test_request_cancel_reports_an_existing_tombstone(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    (a,) = ids(1)
    assert await request_cancel(fake_redis, KEYS, a, ttl=60) is False
    assert await request_cancel(fake_redis, KEYS, a, ttl=60) is True
    assert 0 < await fake_redis.ttl(KEYS.cancel(a)) <= 60


# ---------------------------------------------------------------- budget


def budget(
    redis: fakeredis.FakeAsyncRedis, total: int | None = 100_000, **cfg: Any
) -> RequestBudget:
    return RequestBudget(redis, KEYS, str(uuid.uuid4()), total=total, config=BudgetConfig(**cfg))


async def test_warning_fires_exactly_once_under_concurrent_adds(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    b = budget(fake_redis)
    states = await asyncio.gather(*(b.add(1_700) for _ in range(50)))  # 85,000 in the end
    assert [s.status for s in states].count(BudgetStatus.WARNING) == 1
    assert BudgetStatus.EXHAUSTED not in {s.status for s in states}
    assert sorted(s.used for s in states) == [1_700 * (i + 1) for i in range(50)]
    assert (await b.add(0)).status is BudgetStatus.OK, "never warns twice"


async def test_a_jump_past_the_total_is_exhausted_without_warning(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    b = budget(fake_redis)
    assert (await b.add(79_999)).status is BudgetStatus.OK
    state = await b.add(30_000)
    assert state == BudgetState(BudgetStatus.EXHAUSTED, 109_999, 100_000)
    assert state.percentage > 100
    # Exhausted every time from now on, and the warning never comes.
    assert (await b.add(0)).status is BudgetStatus.EXHAUSTED
    assert (await b.add(1)).status is BudgetStatus.EXHAUSTED


async def test_exactly_at_the_total_is_exhausted(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    b = budget(fake_redis, total=10_000)
    assert (await b.add(7_999)).status is BudgetStatus.OK
    assert (await b.add(1)).status is BudgetStatus.WARNING
    assert (await b.add(2_000)).status is BudgetStatus.EXHAUSTED


def test_budgets_below_the_floor_are_raised(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    assert budget(fake_redis, total=5).total == 10_000
    assert BudgetConfig(default_request_budget=5).default_request_budget == 10_000
    assert budget(fake_redis, total=None).total == 500_000


class Events:
    """A publish function that records what the pause publishes."""

    def __init__(self) -> None:
        self.published: list[BudgetWarning | BudgetDecision] = []
        self.warned = asyncio.Event()

    async def __call__(self, event: BudgetWarning | BudgetDecision) -> None:
        self.published.append(event)
        if isinstance(event, BudgetWarning):
            self.warned.set()


async def open_pause(b: RequestBudget, timeout: float = 5.0) -> tuple[asyncio.Task[Any], Events]:
    events = Events()
    state = BudgetState(BudgetStatus.WARNING, 80_000, 100_000)
    task = asyncio.create_task(b.pause(events, state, timeout=timeout))
    await asyncio.wait_for(events.warned.wait(), 5)
    return task, events


DECISIONS: list[Literal["continue", "stop"]] = ["stop", "continue"]


async def test_first_answer_wins_among_concurrent_answers(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    b = budget(fake_redis)
    task, events = await open_pause(b)
    results = await asyncio.gather(
        *(answer_budget(fake_redis, KEYS, b.request_id, d) for d in DECISIONS * 10),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, dict)]
    assert len(winners) == 1
    assert all(isinstance(r, NoPendingDecision) for r in results if not isinstance(r, dict))
    outcome = await task
    assert (outcome.decision, outcome.decided_by) == ("stop", "client")
    assert [type(e) for e in events.published] == [BudgetWarning, BudgetDecision]
    assert events.published[1].decision == "stop"  # type: ignore[union-attr]
    with pytest.raises(NoPendingDecision):
        await answer_budget(fake_redis, KEYS, b.request_id, "continue")


async def test_a_stale_answer_never_leaks_into_a_later_pause(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    b = budget(fake_redis)
    with pytest.raises(NoPendingDecision):
        await answer_budget(fake_redis, KEYS, b.request_id, "stop")
    # Even an answer left on the decision list by a crashed orchestrator is
    # cleared when the next pause opens.
    await fake_redis.rpush(KEYS.request(b.request_id).decision, "old-pause:stop")
    task, _ = await open_pause(b, timeout=5)
    await asyncio.sleep(0.2)
    assert not task.done(), "the pause waits for an answer of its own"
    await answer_budget(fake_redis, KEYS, b.request_id, "continue")
    outcome = await task
    assert (outcome.decision, outcome.decided_by) == ("continue", "client")


async def test_timeout_applies_the_default_and_publishes_the_decision(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    b = budget(fake_redis, timeout_decision="continue")
    started = time.monotonic()
    task, events = await open_pause(b, timeout=0.3)
    outcome = await task
    assert time.monotonic() - started >= 0.29
    assert (outcome.decision, outcome.decided_by) == ("continue", "timeout")
    decision = events.published[-1]
    assert isinstance(decision, BudgetDecision)
    assert (decision.decision, decision.decided_by) == ("continue", "timeout")
    with pytest.raises(NoPendingDecision):
        await answer_budget(fake_redis, KEYS, b.request_id, "stop")


# ---------------------------------------------------------------- review regressions


async def test_child_of_a_locally_cancelled_token_starts_cancelled(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    registry = CancelRegistry(fake_redis, Keys())
    root = await registry.token(str(uuid.uuid4()))
    root.cancel("shutting down")
    child = await root.child(str(uuid.uuid4()))
    grandchild = await child.child(str(uuid.uuid4()))
    assert child.is_cancelled() and grandchild.is_cancelled()
    assert grandchild.reason == "shutting down"


async def test_cancel_with_by_cancels_the_token_itself(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    registry = CancelRegistry(fake_redis, Keys())
    tok = await registry.token(str(uuid.uuid4()))
    tok.cancel("r", by="operator")
    assert tok.is_cancelled() and tok.cancelled_by == "operator"


async def test_a_failed_registration_leaves_nothing_indexed() -> None:
    dead = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    dead.connection_pool.connection_kwargs["server"].connected = False
    registry = CancelRegistry(dead, Keys())
    with pytest.raises(Exception):  # noqa: B017 - whichever connection error redis raises
        await registry.token(str(uuid.uuid4()))
    assert registry._index == {}
    await dead.aclose()


async def test_every_waiter_of_one_pause_gets_the_same_answer(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    keys = Keys()
    published: list[object] = []

    async def publish(event: object) -> None:
        published.append(event)

    first = RequestBudget(fake_redis, keys, rid, total=10_000)
    other_host = RequestBudget(fake_redis, keys, rid, total=10_000)
    state = await first.add(8_500)
    opener = asyncio.create_task(first.pause(publish, state, timeout=10))
    async with asyncio.timeout(5):
        while (await other_host.add(0)).paused is False:
            await asyncio.sleep(0.01)
    joiner = asyncio.create_task(other_host.join_pause())
    await asyncio.sleep(0.05)
    await answer_budget(fake_redis, keys, rid, "continue")
    a, b = await asyncio.wait_for(asyncio.gather(opener, joiner), 5)
    assert a == b == PauseOutcome("continue", "client")


async def test_an_answer_naming_an_ended_pause_never_reaches_the_next(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    keys = Keys()

    async def publish(event: object) -> None:
        return None

    budget = RequestBudget(fake_redis, keys, rid, total=10_000)
    state = await budget.add(8_500)
    first = await budget.pause(publish, state, timeout=0.2, default="stop")
    assert first == PauseOutcome("stop", "timeout")
    second = asyncio.create_task(budget.pause(publish, state, timeout=10))
    async with asyncio.timeout(5):
        while (pending := await budget.pending()) is None:
            await asyncio.sleep(0.01)
    with pytest.raises(NoPendingDecision):
        await answer_budget(fake_redis, keys, rid, "continue", pause_id="an-ended-pause")
    await answer_budget(fake_redis, keys, rid, "stop", pause_id=pending["pause_id"])
    assert await asyncio.wait_for(second, 5) == PauseOutcome("stop", "client")


async def test_a_cancelled_pause_is_closed_so_late_answers_are_refused(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    budget = RequestBudget(fake_redis, Keys(), rid, total=10_000)

    async def publish(event: object) -> None:
        return None

    task = asyncio.create_task(budget.pause(publish, await budget.add(8_500), timeout=30))
    async with asyncio.timeout(5):
        while await budget.pending() is None:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await budget.pending() is None
    with pytest.raises(NoPendingDecision):
        await answer_budget(fake_redis, Keys(), rid, "continue")
