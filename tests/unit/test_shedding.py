"""What keeps a saturated gateway cheap to run: refills served from memory,
replies ahead of queued events (see relay/gateway/recent.py and sendqueue.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import fakeredis

from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.recent import RecentEvents
from relay.gateway.sendqueue import Begin, SendQueue
from relay.gateway.store import RequestStore
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys

KEYS = Keys("default")
AGENT = str(uuid.uuid4())


def env(rid: str, seq: int, epoch: str = "e1", size: int = 10) -> Envelope:
    return Envelope(rid, seq, epoch, "agent_text_delta", "x" * size, nbytes=size)


def seqs(events: list[Envelope] | None) -> list[int] | None:
    return None if events is None else [e.seq for e in events]


def test_recent_serves_only_complete_ranges() -> None:
    recent = RecentEvents(max_bytes=1 << 20, per_request=100)
    for seq in range(1, 11):
        recent.add("t", env("r", seq))
    assert seqs(recent.range("t", "r", "e1", 3, 6)) == [4, 5, 6]
    assert seqs(recent.range("t", "r", "e1", 0, 10)) == list(range(1, 11))
    assert recent.range("t", "r", "e1", 5, 11) is None  # not yet seen
    assert recent.range("t", "r", "e2", 3, 6) is None  # another epoch
    assert recent.range("other", "r", "e1", 3, 6) is None  # another tenant
    recent.add("t", env("r", 10))  # a duplicate changes nothing
    recent.add("t", env("r", 12))  # a hole: what came before cannot serve past it
    assert recent.range("t", "r", "e1", 3, 6) is None
    assert seqs(recent.range("t", "r", "e1", 11, 12)) == [12]
    recent.add("t", env("r", 1, epoch="e2"))  # a new epoch starts over
    assert seqs(recent.range("t", "r", "e2", 0, 1)) == [1]
    assert recent.range("t", "r", "e1", 11, 12) is None


def test_recent_is_bounded_by_bytes_and_per_request() -> None:
    recent = RecentEvents(max_bytes=1000, per_request=20)
    for seq in range(1, 101):
        recent.add("t", env("a", seq))
    assert len(recent) == 20 and recent.nbytes == 200
    assert recent.range("t", "a", "e1", 79, 80) is None  # evicted
    assert seqs(recent.range("t", "a", "e1", 80, 81)) == [81]
    for seq in range(1, 101):  # another request, published later, pushes "a" out
        recent.add("t", env("b", seq, size=50))
    assert recent.nbytes <= 1000
    assert recent.range("t", "a", "e1", 99, 100) is None
    assert seqs(recent.range("t", "b", "e1", 99, 100)) == [100]
    recent.forget("t", "b")
    assert recent.nbytes == 0 and len(recent) == 0


async def test_a_refill_inside_what_is_kept_reads_no_redis(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    rid = str(uuid.uuid4())
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish_many(
        rid, [{"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)} for i in range(8)]
    )
    epoch = cast(bytes, await fake_redis.get(KEYS.request(rid).epoch)).decode()
    history = cast(list[Any], await fake_redis.xrange(KEYS.request(rid).history))
    recent = RecentEvents(max_bytes=1 << 20, per_request=100)
    for entry_id, fields in history[4:]:  # this process saw seqs 5..8 live
        seq = int(entry_id.split(b"-")[0])
        recent.add("default", Envelope.from_history(rid, epoch, seq, fields[b"f"]))
    store = RequestStore(fake_redis, KEYS, batch=2, recent=recent)
    reads = 0
    xrange = fake_redis.xrange

    async def counting_xrange(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await xrange(*args, **kwargs)

    setattr(fake_redis, "xrange", counting_xrange)  # noqa: B010 (a method, replaced)
    got = [e.seq async for batch in store.replay(rid, epoch, 4, 8) for e in batch]
    assert got == [5, 6, 7, 8] and reads == 0
    got = [e.seq async for batch in store.replay(rid, epoch, 2, 8) for e in batch]
    assert got == [3, 4, 5, 6, 7, 8] and reads > 0  # reaches back further: Redis


def test_a_reply_goes_before_queued_events_but_a_subscription_start_does_not() -> None:
    queue = SendQueue(100, 1 << 20, "drop_oldest", Metrics())
    for seq in range(1, 4):
        queue.push_event(env("r", seq))
    queue.push_control('{"type":"pong"}')
    assert queue.pop() == '{"type":"pong"}'
    begin = Begin("s", None, 0, [], None)
    queue.push_control(begin)
    queue.push_control('{"type":"pong","command_id":"2"}')
    order = [queue.pop() for _ in range(5)]
    assert [getattr(i, "seq", i) for i in order] == [
        1,
        2,
        3,
        begin,
        '{"type":"pong","command_id":"2"}',
    ]
    assert queue.pop() is None


async def test_a_reply_skips_the_turns_of_busy_writers(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    """Among thousands of busy writers a writer got one turn per round; a
    client pinging faster than that saw its pongs fall behind without end."""
    from relay.gateway.sendqueue import SendTurns
    from tests.unit.test_hardening import busy_writer

    sent: list[str] = []

    class Sink:
        def __init__(self, name: str) -> None:
            self.name = name

        async def send_text(self, text: str) -> None:
            sent.append(self.name)

    turns = SendTurns(frames_per_round=16)
    store = RequestStore(fake_redis, KEYS)
    writers = [busy_writer(Sink("busy"), turns, store, 100, 50) for _ in range(300)]
    pinger = busy_writer(Sink("pong"), turns, store, 100, 0)
    tasks = [asyncio.create_task(w.run()) for w in [*writers, pinger]]
    try:
        async with asyncio.timeout(5):
            while len(sent) < 600:  # two full rounds: every busy writer is waiting its turn
                await asyncio.sleep(0)
            pinger.queue.push_control('{"type":"pong"}')
            before = len(sent)
            while "pong" not in sent:
                await asyncio.sleep(0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Sent within about one pass of the loop (16 turns), not after a round of 300.
    assert sent.index("pong") - before < 100, sent.index("pong") - before


def test_overload_sheds_the_connections_furthest_behind_first() -> None:
    from relay.config import GatewayConfig
    from relay.gateway.sendqueue import CLOSE_TRY_AGAIN_LATER, SendTurns
    from relay.gateway.shedder import SHED_REASON, OverloadShedder

    turns = SendTurns()
    metrics = Metrics()
    queues = [SendQueue(1000, 1 << 24, "drop_oldest", metrics, turns=turns) for _ in range(20)]
    for depth, queue in enumerate(queues):
        for seq in range(1, depth + 2):
            queue.push_event(env("r", seq))
    replies_only = SendQueue(1000, 1 << 24, "drop_oldest", metrics, turns=turns)
    for _ in range(500):
        replies_only.push_control('{"type":"pong"}')
    config = GatewayConfig(overload_lag_seconds=0.5, overload_shed_fraction=0.1)
    shedder = OverloadShedder(config, turns, metrics)
    assert shedder.check(0.2) == 0  # late, but under the limit
    assert all(q.close_code is None for q in queues)
    assert shedder.check(2.0) == 2  # a tenth of the 20 with events waiting
    assert [q.close_code for q in queues[-2:]] == [CLOSE_TRY_AGAIN_LATER] * 2
    assert [q.close_reason for q in queues[-2:]] == [SHED_REASON] * 2
    assert all(q.close_code is None for q in queues[:-2])
    assert shedder.check(2.0) == 1  # still late: the next deepest of the 18 left
    assert queues[-3].close_code == CLOSE_TRY_AGAIN_LATER
    assert replies_only.close_code is None
    assert metrics.connections_shed._value.get() == 3


async def test_a_blocked_event_loop_is_noticed_and_shed() -> None:
    import time

    from relay.config import GatewayConfig
    from relay.gateway.sendqueue import CLOSE_TRY_AGAIN_LATER, SendTurns
    from relay.gateway.shedder import OverloadShedder

    turns = SendTurns()
    queue = SendQueue(1000, 1 << 24, "drop_oldest", Metrics(), turns=turns)
    queue.push_event(env("r", 1))
    config = GatewayConfig(overload_lag_seconds=0.05, overload_check_interval=0.01)
    shedder = OverloadShedder(config, turns, Metrics())
    await shedder.start()
    try:
        await asyncio.sleep(0.02)  # the shedder is waiting for its wake-up
        time.sleep(0.3)  # noqa: ASYNC251 (the point: a loop busy for 0.3 s, nothing else runs)
        await asyncio.wait_for(queue.overflowed(), 5)
    finally:
        await shedder.close()
    assert queue.close_code == CLOSE_TRY_AGAIN_LATER and shedder.lag >= 0.05


def test_a_growing_delivery_lag_sheds_what_was_not_sent_and_a_draining_one_nothing() -> None:
    from relay.config import GatewayConfig
    from relay.gateway.sendqueue import SendTurns
    from relay.gateway.shedder import SHED_REASON, OverloadShedder

    turns = SendTurns()
    metrics = Metrics()
    queues = [SendQueue(1000, 1 << 24, "drop_oldest", metrics, turns=turns) for _ in range(100)]
    for queue in queues:
        queue.push_event(env("r", 1))
    config = GatewayConfig(overload_lag_seconds=1.0, overload_check_interval=0.25)
    shedder = OverloadShedder(config, turns, metrics)
    assert shedder.check(0.0, behind=0.9, now=0.0) == 0  # under the limit
    turns.offered += 1000  # a second in which 1,000 events were queued, 400 sent
    turns.taken += 400
    # Over and growing: the 60% not sent, at most half (MAX_SHED) at once.
    assert shedder.check(0.0, behind=1.5, now=1.0) == 50
    turns.offered += 1000  # queued while the shed connections were being closed
    assert shedder.check(0.0, behind=1.6, now=1.25) == 0  # too soon to judge that shed
    turns.offered += 400  # measured from after the shed only
    turns.taken += 300
    assert shedder.check(0.0, behind=1.7, now=2.0) == 12  # still growing: a quarter of the 50
    # Falling by at least half the interval: it drains by itself.
    assert shedder.check(0.0, behind=1.4, now=3.0) == 0
    # Over and hardly falling, nothing measurably unsent: the smallest shed.
    assert shedder.check(0.0, behind=1.38, now=3.25) == 3
    assert shedder.check(0.0, behind=0.5, now=3.5) == 0
    assert metrics.connections_shed._value.get() == 65
    shed = [q for q in queues if q.close_code is not None]
    assert len(shed) == 65 and all(q.close_reason == SHED_REASON for q in shed)


def test_delivery_lag_counts_only_while_writers_wait_for_a_turn() -> None:
    """One slow client on an idle gateway is the overflow policy's business;
    old events in every queue while writers wait for the CPU are overload."""
    import time

    from relay.config import GatewayConfig
    from relay.gateway.sendqueue import SendTurns
    from relay.gateway.shedder import OverloadShedder

    turns = SendTurns()
    now = time.monotonic()
    for age in (1.0, 3.0, 5.0):
        queue = SendQueue(1000, 1 << 24, "drop_oldest", Metrics(), turns=turns)
        queue.push_event(
            Envelope("r", 1, "e1", "agent_text_delta", "x", nbytes=1, received=now - age)
        )
        queue.push_event(env("r", 2))  # newer events behind it do not count
    shedder = OverloadShedder(GatewayConfig(), turns, Metrics())
    assert shedder.measure_behind() == 0.0  # nobody waits for a turn
    loop = asyncio.new_event_loop()
    try:
        turns._waiting.append((loop.create_future(), 1))  # a writer queued for its turn
        assert 3.0 <= shedder.measure_behind() < 3.5  # the median oldest age
    finally:
        loop.close()
