"""The bounded send queue of one connection, and its overflow policy.

Two kinds of items, kept in arrival order by a shared counter:

* events (:class:`Envelope`, shared with every other connection): bounded by
  count (``gateway.send_queue_max``) and bytes (``gateway.send_queue_max_bytes``).
  When full, the overflow policy applies. ``drop_oldest`` drops the oldest
  events and remembers, per request, how many and which seq range (a
  :class:`Lag`), so the writer can tell the client ``lagged`` and refill the
  range from history. ``close`` stops taking events and asks for the
  connection to be closed with 1013 (try again later);
* control items (reply frames, subscription starts, stream resets): never
  dropped; a client that floods commands without reading is closed with 1008.
  Reply frames are sent before queued events (see :meth:`SendQueue.pop`).

Lag records are bounded too (``max_lagged`` requests): a tenant-wide client
so far behind that events of more requests than that were dropped cannot be
caught up request by request any more, and is closed with 1013 to reconnect.

Nothing here awaits: the hub offers events from its reader task and must
never block on one slow client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal

from relay.aio import Signal
from relay.gateway.directsend import PassBudget
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
MAX_CONTROL_ITEMS = 1024
FRAMES_PER_ROUND = 256
"""Frames all writers with work together send before each yields once (a few ms
of sends): about what a ping, a new connection or the probe waits for at most."""
TURN_FRAMES = 8
"""The least a writer sends per turn. A turn costs a task switch (and, when
writers queue, a future): at one frame per turn that switch was paid per
delivery, the largest share of relay's cost above the ceiling's with 1,000
clients (py-spy). Fewer writers per pass, each sending more, keeps a pass
the same length."""

DIRECT_SHARE = 4
"""Direct sends per pass of the loop, in ``frames_per_round``: a direct send
costs a fraction of a writer's turn (no task switch), so more of them fit in
the same few milliseconds, and one event reaches a thousand parked
connections in one pass."""


class SendTurns:
    """Shares the event loop fairly between the writers of one process.

    Counts the queues that hold something (the writers with work). Each writer
    sends at most ``frames_per_round / that count`` frames (``min_frames``
    at least) before it yields, so one round of all of them stays near the same length
    however many there are, while a lone busy writer still sends long runs
    without paying for a yield per frame. Counting queues, not running
    writers: writers run one after another within a round, so at any moment
    only one of them is running, however many are waiting their turn.

    With more writers with work than ``frames_per_round / min_frames`` the
    quota cannot go below ``min_frames``, and a round of thousands of
    writers, all in one pass, made that pass last as long as thousands of
    sends: a ping, a new connection or the delivery probe needs several
    passes, and waited seconds. Past that point writers queue for their turn
    instead (:meth:`next_turn`): each pass of the loop admits writers, in
    arrival order, until the frames they said they would send reach
    ``frames_per_round``, so a pass stays a few milliseconds long and
    everything else keeps being served while the writers share what is
    left. The queues then fill, and their overflow policy sheds what cannot
    be sent.
    """

    def __init__(
        self,
        frames_per_round: int = FRAMES_PER_ROUND,
        min_frames: int = TURN_FRAMES,
        direct_frames: int | None = None,
    ) -> None:
        self.frames_per_round = frames_per_round
        self.min_frames = max(1, min(min_frames, frames_per_round))
        self.busy: set[SendQueue] = set()
        """The queues that hold something (what the overload shedder chooses from)."""
        self._waiting: deque[tuple[asyncio.Future[None], int]] = deque()
        """Writers waiting for a turn, each with the frames it will send in it."""
        self._admitting = False
        self.offered = 0
        """Events queued so far, over every queue (what the process was asked to send)."""
        self.taken = 0
        """Events taken off the queues by their writers so far (what it managed to)."""
        self.direct = PassBudget(
            DIRECT_SHARE * frames_per_round if direct_frames is None else direct_frames
        )
        """What the hub may still send itself (see :mod:`~relay.gateway.directsend`)."""

    @property
    def pending(self) -> int:
        """How many queues hold something: the writers with work."""
        return len(self.busy)

    def quota(self) -> int:
        """How many frames the current writer may send before yielding."""
        return max(self.min_frames, self.frames_per_round // max(1, self.pending))

    @property
    def queued(self) -> int:
        """Writers waiting for a turn: they have work and a writable socket, and wait
        for the CPU (a writer blocked on a client that does not read is not here)."""
        return len(self._waiting)

    def crowded(self) -> bool:
        """More writers have work than one pass of the loop may serve."""
        return self.pending * self.min_frames > self.frames_per_round

    async def next_turn(self, frames: int = 1) -> None:
        """Yield the loop until this writer's next turn, in which it will send
        about ``frames`` frames (what a pass of the loop is measured in)."""
        if not self.crowded() and not self._waiting:
            await asyncio.sleep(0)  # everyone gets a turn every pass
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append((turn, max(1, frames)))
        if not self._admitting:
            self._admitting = True
            loop.call_soon(self._admit)
        await turn  # a cancelled writer's turn is skipped by _admit

    def _admit(self) -> None:
        # Runs once per pass of the loop while writers wait: the writers woken
        # here run in the next pass, and so does the next _admit (call_soon
        # queues both behind everything already ready, I/O callbacks included).
        room = self.frames_per_round
        waiting = self._waiting
        while waiting and room > 0:
            turn, frames = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                room -= frames
        if waiting:
            asyncio.get_running_loop().call_soon(self._admit)
        else:
            self._admitting = False


@dataclass(slots=True)
class Begin:
    """The start of a subscription, applied by the writer in queue order.

    Setting the request's position when the command is handled (rather than
    when the writer reaches this item) let events of the same request that
    were already queued (a firehose connection narrowing itself, or a second
    ``subscribe``) be sent against the new position: the client got them
    twice, or out of order. Everything queued before this item belongs to the
    previous stream; the reply frames come next, then history after ``last``
    up to ``replay_until``, then live events.
    """

    request_id: str
    epoch: str | None
    last: int
    frames: list[str]
    replay_until: int | None


@dataclass(slots=True)
class Reset:
    """A request's stream cannot be continued (new epoch, history gap)."""

    request_id: str
    epoch: str | None
    reason: str


@dataclass(slots=True)
class Lag:
    """Events of one request dropped from a full queue: how many, and which range."""

    count: int
    first: int
    last: int
    epoch: str


Control = str | Begin | Reset


class SendQueue:
    """Events and control items waiting for the connection's writer."""

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        policy: Literal["drop_oldest", "close"],
        metrics: Metrics,
        max_lagged: int = 4096,
        turns: SendTurns | None = None,
    ) -> None:
        self.max_events = max_events
        self.max_lagged = max_lagged
        self.max_bytes = max_bytes
        self.drop_oldest = policy == "drop_oldest"
        self.metrics = metrics
        self._events: deque[tuple[int, Envelope]] = deque()
        # A list, not a deque: control items are few and short-lived, and an
        # empty deque is 760 bytes kept by every idle connection.
        self._control: list[tuple[int, Control]] = []
        self._counter = 0
        self.nbytes = 0
        self.turns = turns or SendTurns()
        self.holding = False
        """Holds at least one item (and is counted in ``turns.pending``)."""
        self.wake = Signal()
        """Set whenever something was added; the writer clears it before waiting."""
        self.lags: dict[str, Lag] = {}
        """Dropped ranges per request, until the writer settles them."""
        self.close_code: int | None = None
        self.close_reason = "send queue overflow"
        # Done when the connection must be closed. The writer may be blocked in
        # a send to a client that reads nothing, so the connection waits for
        # this too and then stops the writer: a flag seen only by the writer
        # would never be seen for a stalled client, while the close policy
        # kept queueing every event (unbounded memory). A future, made when
        # first asked for, not an Event and a task waiting on it: both would
        # be kept by every connection for its whole life.
        self._overflowed: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._events)

    def oldest(self) -> float | None:
        """When the oldest queued event reached this process (None: no event queued)."""
        return self._events[0][1].received if self._events else None

    def idle(self) -> bool:
        """Nothing is queued, neither events nor control items."""
        return not self._events and not self._control

    def reply_waiting(self) -> bool:
        """A reply frame is next (it is sent before queued events; see :meth:`pop`)."""
        return bool(self._control) and isinstance(self._control[0][1], str)

    def push_event(self, env: Envelope) -> None:
        """Queue an event, applying the overflow policy when full."""
        if self.close_code is not None:
            return  # closing: the queue takes nothing more
        if not self.holding:
            self.holding = True
            self.turns.busy.add(self)
        self._counter += 1
        self._events.append((self._counter, env))
        self.turns.offered += 1
        self.nbytes += env.nbytes
        while len(self._events) > self.max_events or self.nbytes > self.max_bytes:
            if not self.drop_oldest or self.close_code is not None:
                self.fail(CLOSE_TRY_AGAIN_LATER)
                break
            _, old = self._events.popleft()
            self.nbytes -= old.nbytes
            self._note_drop(old)
            self.metrics.queue_drops.inc()
        self.wake.set()

    def _note_drop(self, old: Envelope) -> None:
        # Remember the dropped range, not just a count: the writer refills it
        # from history even when no later event of that request is queued (a
        # firehose client whose queue was flooded by another request lost the
        # tail of a finished request for good before), and even when the
        # request's very first event was dropped (no position to see a gap from).
        lag = self.lags.get(old.request_id)
        if lag is None or lag.epoch != old.epoch:
            if lag is None and len(self.lags) >= self.max_lagged:
                self.fail(CLOSE_TRY_AGAIN_LATER)
                return
            self.lags[old.request_id] = Lag(1, old.seq, old.seq, old.epoch)
            return
        lag.count += 1
        lag.first = min(lag.first, old.seq)
        lag.last = max(lag.last, old.seq)

    def take_lag(self, request_id: str) -> Lag | None:
        """The dropped range of ``request_id``, handed over to the writer (and forgotten)."""
        return self.lags.pop(request_id, None)

    def lagged_requests(self) -> list[str]:
        """Requests with dropped events not yet settled."""
        return list(self.lags)

    def push_control(self, item: Control) -> None:
        """Queue a control item; never dropped, but bounded against command floods."""
        if self.close_code is not None:
            return
        if not self.holding:
            self.holding = True
            self.turns.busy.add(self)
        self._counter += 1
        self._control.append((self._counter, item))
        if len(self._control) > MAX_CONTROL_ITEMS:
            self.fail(CLOSE_POLICY_VIOLATION)
        self.wake.set()

    def fail(self, code: int, reason: str | None = None) -> None:
        """Ask for the connection to be closed with ``code`` and ``reason`` (the
        close frame's text; first call wins)."""
        if self.close_code is None:
            self.close_code = code
            if reason is not None:
                self.close_reason = reason
            if self._overflowed is not None and not self._overflowed.done():
                self._overflowed.set_result(None)

    def overflowed(self) -> asyncio.Future[None]:
        """A future done once the connection must be closed (see :meth:`fail`);
        the same one on every call. Needs a running loop."""
        if self._overflowed is None:
            self._overflowed = asyncio.get_running_loop().create_future()
            if self.close_code is not None:
                self._overflowed.set_result(None)
        return self._overflowed

    def pop(self) -> Envelope | Control | None:
        """The oldest item of either kind, or None when empty.

        A reply frame (a ``pong``, an ``ack``, an ``error``) at the head of the
        control items goes before older events: behind a full queue of a
        client that keeps up only just, a pong waited for a thousand events
        and the client's liveness check failed exactly when the gateway was
        busiest. Replies carry no seq and every event filter is applied at
        send time, so nothing a client sees changes but the wait. Subscription
        starts and stream resets stay in order with the events.
        """
        events, control = self._events, self._control
        reply_first = self.reply_waiting()
        if events and not reply_first and (not control or events[0][0] < control[0][0]):
            _, env = events.popleft()
            self.nbytes -= env.nbytes
            self.turns.taken += 1
            if not events and not control:
                self._release_turn()
            return env
        if control:
            item = control.pop(0)[1]
            if not events and not control:
                self._release_turn()
            return item
        self._release_turn()
        return None

    def _release_turn(self) -> None:
        if self.holding:
            self.holding = False
            self.turns.busy.discard(self)

    def close(self) -> None:
        """The connection is done: it no longer waits for a turn."""
        self._release_turn()
