"""Direct sends: the hub writes an event itself to a connection whose writer is parked."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from starlette.types import Message, Scope
from starlette.websockets import WebSocket, WebSocketState

from relay.gateway.directsend import PASS_BYTES, PassBudget, Resumed, start
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import Begin, SendQueue, SendTurns
from relay.gateway.shortcut import SERVER_SEND
from relay.gateway.writer import OrderedWriter
from tests.support import eventually
from tests.unit.test_writer import writer_for


class Server:
    """The server's side of one socket: a ``send`` that waits while the socket is
    not writable, as uvicorn's does."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def send(self, message: Message) -> None:
        await self.writable.wait()
        self.frames.append(message["text"])


def socket(server: Server) -> WebSocket:
    async def receive() -> Message:
        raise AssertionError("not read")

    async def through_starlette(message: Message) -> None:
        raise AssertionError("frames must not go through Starlette here")

    scope: Scope = {"type": "websocket", "path": "/ws", "headers": [], SERVER_SEND: server.send}
    ws = WebSocket(scope, receive, through_starlette)
    ws.application_state = WebSocketState.CONNECTED
    return ws


def event(rid: str, seq: int) -> Envelope:
    return Envelope(rid, seq, "e", "agent_text_delta", f'{{"seq":{seq}}}')


async def parked_writer(
    server: Server, rid: str, turns: SendTurns
) -> tuple[OrderedWriter, SendQueue, asyncio.Task[None]]:
    """A running writer that has sent its subscription start and waits for work."""
    queue = SendQueue(100, 1 << 20, "drop_oldest", Metrics(), turns=turns)
    queue.push_control(Begin(rid, "e", 0, ['{"type":"subscribed"}'], None))
    writer = writer_for(socket(server), queue)
    task = asyncio.create_task(writer.run())
    await eventually(lambda: writer._parked, 5, "the writer waits for work")
    return writer, queue, task


def offer(writer: OrderedWriter, queue: SendQueue, env: Envelope) -> None:
    """What Connection.offer does once the connection wants the event."""
    if not writer.offer_direct(env):
        queue.push_event(env)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_event_for_a_parked_writer_is_sent_before_the_offer_returns() -> None:
    server, rid = Server(), str(uuid.uuid4())
    writer, queue, task = await parked_writer(server, rid, SendTurns())
    offer(writer, queue, event(rid, 1))
    # No await in between: the frame was written from the offer's own stack,
    # without waking the writer task.
    assert server.frames == ['{"type":"subscribed"}', '{"seq":1}']
    track = writer.tracks.get(rid)
    assert track is not None and track.last == 1
    assert writer._parked and len(queue) == 0
    await stop(task)


async def test_a_send_that_suspends_is_finished_by_the_writer_in_order() -> None:
    server, rid = Server(), str(uuid.uuid4())
    writer, queue, task = await parked_writer(server, rid, SendTurns())
    server.writable.clear()  # the socket's buffer is full
    for seq in (1, 2, 3):
        offer(writer, queue, event(rid, seq))
    assert server.frames == ['{"type":"subscribed"}']
    assert len(queue) == 2  # behind the suspended send: queued, not sent around it
    server.writable.set()
    await eventually(lambda: len(server.frames) == 4, 5, "every frame sent")
    assert server.frames[1:] == ['{"seq":1}', '{"seq":2}', '{"seq":3}']
    await eventually(lambda: writer._parked, 5, "the writer parks again")
    offer(writer, queue, event(rid, 4))
    assert server.frames[-1] == '{"seq":4}'  # and sends directly again
    await stop(task)


async def test_a_stopped_writer_gets_nothing_sent_for_it() -> None:
    # The connection closes (a token expired): its writer is cancelled but
    # stays parked until its task runs; the hub must not send meanwhile.
    server, rid = Server(), str(uuid.uuid4())
    writer, _, task = await parked_writer(server, rid, SendTurns())
    writer.stop()
    task.cancel()
    assert not writer.offer_direct(event(rid, 1))
    assert server.frames == ['{"type":"subscribed"}']
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_out_of_order_or_queued_events_take_the_writer() -> None:
    server, rid = Server(), str(uuid.uuid4())
    writer, queue, task = await parked_writer(server, rid, SendTurns())
    offer(writer, queue, event(rid, 2))  # a gap: history must fill seq 1 first
    assert server.frames == ['{"type":"subscribed"}'] and len(queue) == 1
    await stop(task)


async def test_direct_sends_share_one_budget_per_pass_of_the_loop() -> None:
    turns = SendTurns(direct_frames=2)
    servers = [Server() for _ in range(3)]
    rids = [str(uuid.uuid4()) for _ in servers]
    parked = [await parked_writer(s, r, turns) for s, r in zip(servers, rids, strict=True)]
    for (writer, queue, _), rid in zip(parked, rids, strict=True):
        offer(writer, queue, event(rid, 1))
    sent_now = [len(s.frames) == 2 for s in servers]
    assert sent_now == [True, True, False]  # the third waits for its writer's turn
    await eventually(lambda: len(servers[2].frames) == 2, 5, "the queued one is sent")
    for _, _, task in parked:
        await stop(task)


async def test_counters_of_direct_sends_are_flushed_when_the_pass_ends() -> None:
    server, rid = Server(), str(uuid.uuid4())
    writer, queue, task = await parked_writer(server, rid, SendTurns())

    def sent() -> float | None:
        return writer.metrics.registry.get_sample_value("relay_events_sent_total")

    before = sent() or 0.0
    offer(writer, queue, event(rid, 1))
    offer(writer, queue, event(rid, 2))
    assert (sent() or 0.0) == before  # per pass, not per delivery
    await eventually(lambda: sent() == before + 2, 5, "counted when the pass ends")
    assert writer._parked  # counted without waking the writer
    await stop(task)


async def test_start_runs_a_send_to_its_first_suspension_and_resumed_finishes_it() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def quick() -> None:
        steps.append("quick")

    async def slow() -> None:
        steps.append("slow: before")
        await gate.wait()
        steps.append("slow: after")

    assert start(quick()) is None and steps == ["quick"]
    resumed = start(slow())
    assert resumed is not None and steps[-1] == "slow: before"
    task = asyncio.create_task(asyncio.wait_for(resumed_await(resumed), 5))
    await asyncio.sleep(0)
    gate.set()
    await task
    assert steps[-1] == "slow: after"


async def resumed_await(resumed: Resumed) -> None:
    await resumed


async def test_cancelling_the_owner_of_a_resumed_send_cancels_the_send() -> None:
    cleaned: list[str] = []

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("send's finally ran")

    resumed = start(stuck())
    assert resumed is not None
    task = asyncio.create_task(resumed_await(resumed))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # the cancellation went into the send and out again
    assert cleaned == ["send's finally ran"]


async def test_the_budget_is_bounded_per_pass() -> None:
    budget = PassBudget(3)
    first = [budget.take(100) for _ in range(4)]
    await asyncio.sleep(0)  # the next pass
    assert [*first, budget.take(100)] == [True, True, True, False, True]


async def test_past_the_budget_of_a_second_events_take_the_queues_until_the_next() -> None:
    now = [100.0]
    budget = PassBudget(10, per_second=3, clock=lambda: now[0])
    first = [budget.take(100) for _ in range(4)]
    await asyncio.sleep(0)  # the next pass, the same second
    assert [*first, budget.take(100)] == [True, True, True, False, False]
    now[0] += 1.0
    await asyncio.sleep(0)
    assert budget.take(100)


async def test_a_pass_of_direct_sends_is_bounded_in_bytes_too() -> None:
    budget = PassBudget(1000)
    taken = 0
    while budget.take(1024):
        taken += 1
    assert taken == PASS_BYTES // 1024
    await asyncio.sleep(0)
    assert budget.take(1024)


async def test_a_pass_of_direct_sends_updates_the_counters_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns, metrics = SendTurns(), Metrics()
    servers = [Server() for _ in range(3)]
    rids = [str(uuid.uuid4()) for _ in servers]
    parked = [await parked_writer(s, r, turns) for s, r in zip(servers, rids, strict=True)]
    for writer, _, _ in parked:
        writer.metrics = metrics  # one registry per process, as in a gateway
    incs: list[float] = []
    inc = metrics.events_out.inc

    def counting(amount: float = 1.0) -> None:
        incs.append(amount)
        inc(amount)

    monkeypatch.setattr(metrics.events_out, "inc", counting)
    for (writer, queue, _), rid in zip(parked, rids, strict=True):
        offer(writer, queue, event(rid, 1))
    await eventually(lambda: bool(incs), 5, "the pass ends")
    assert incs == [3]  # one update for the pass, not one per writer
    for _, _, task in parked:
        await stop(task)


async def test_latency_is_sampled_however_few_sends_a_pass_has() -> None:
    server, rid = Server(), str(uuid.uuid4())
    writer, queue, task = await parked_writer(server, rid, SendTurns())

    def samples() -> float:
        return writer.metrics.registry.get_sample_value("relay_publish_to_send_seconds_count") or 0

    for seq in range(1, 17):
        offer(writer, queue, Envelope(rid, seq, "e", "agent_text_delta", "{}", ts=1))
        await asyncio.sleep(0)  # one send per pass
    assert len(server.frames) == 17 and samples() == 2
    await stop(task)
