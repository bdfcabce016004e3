"""What an idle connection keeps: two tasks, small signals, a small queue."""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid

import fakeredis
import pytest

from relay.aio import Signal
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import SendQueue, SendTurns
from tests.unit.test_connection import running


async def test_a_signal_wakes_its_waiter_and_can_be_reused() -> None:
    signal = Signal()
    waiter = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    signal.set()
    await asyncio.wait_for(waiter, 5)
    assert signal.is_set()
    await signal.wait()  # set: returns at once
    signal.clear()
    again = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not again.done()
    signal.set()
    await asyncio.wait_for(again, 5)


async def test_a_cancelled_wait_leaves_the_signal_usable_and_a_second_waiter_is_refused() -> None:
    signal = Signal()
    first = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one waiter"):
        await signal.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    later = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    signal.set()
    await asyncio.wait_for(later, 5)


async def test_overflowed_is_done_whether_the_failure_came_before_or_after_asking() -> None:
    early = SendQueue(10, 1 << 20, "close", Metrics())
    early.fail(1013)
    assert early.overflowed().done()
    late = SendQueue(10, 1 << 20, "close", Metrics())
    overflowed = late.overflowed()
    assert not overflowed.done() and late.overflowed() is overflowed
    late.fail(1013)
    assert overflowed.done()


async def test_an_idle_connection_runs_two_tasks(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    # A task waiting for the queue to overflow, kept by every connection for
    # its whole life, was a task, a coroutine, an Event and a future each.
    async with running(fake_redis, query=f"request_id={uuid.uuid4()}"):
        names = sorted(
            name for t in asyncio.all_tasks() if (name := t.get_name()).startswith("relay-conn-")
        )
        assert names == ["relay-conn-reader", "relay-conn-writer"]


async def test_a_send_queue_keeps_under_one_and_a_half_kib() -> None:
    # Two asyncio.Events (a 760-byte deque and a dict each) and a second deque
    # made it over 4 KiB, per connection, for its whole life.
    turns, metrics = SendTurns(), Metrics()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        queue = SendQueue(1024, 1 << 22, "drop_oldest", metrics, turns=turns)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    mine = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the snapshots' own
    grown = sum(
        stat.size_diff
        for stat in after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
    )
    assert queue.idle()
    assert grown < 1536, f"a SendQueue took {grown} bytes"
