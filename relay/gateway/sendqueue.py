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

from .envelope import Envelope
from .metrics import Metrics

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
MAX_CONTROL_ITEMS = 1024


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
    ) -> None:
        self.max_events = max_events
        self.max_lagged = max_lagged
        self.max_bytes = max_bytes
        self.drop_oldest = policy == "drop_oldest"
        self.metrics = metrics
        self._events: deque[tuple[int, Envelope]] = deque()
        self._control: deque[tuple[int, Control]] = deque()
        self._counter = 0
        self.nbytes = 0
        self.wake = asyncio.Event()
        """Set whenever something was added; the writer clears it before waiting."""
        self.lags: dict[str, Lag] = {}
        """Dropped ranges per request, until the writer settles them."""
        self.close_code: int | None = None
        # Set when the connection must be closed. The writer may be blocked in
        # a send to a client that reads nothing, so the connection waits for
        # this event too and then stops the writer: a flag seen only by the
        # writer would never be seen for a stalled client, while the close
        # policy kept queueing every event (unbounded memory).
        self.overflow = asyncio.Event()

    def __len__(self) -> int:
        return len(self._events)

    def idle(self) -> bool:
        """Nothing is queued, neither events nor control items."""
        return not self._events and not self._control

    def push_event(self, env: Envelope) -> None:
        """Queue an event, applying the overflow policy when full."""
        if self.close_code is not None:
            return  # closing: the queue takes nothing more
        self._counter += 1
        self._events.append((self._counter, env))
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
        self._counter += 1
        self._control.append((self._counter, item))
        if len(self._control) > MAX_CONTROL_ITEMS:
            self.fail(CLOSE_POLICY_VIOLATION)
        self.wake.set()

    def fail(self, code: int) -> None:
        """Ask for the connection to be closed with ``code`` (first reason wins)."""
        if self.close_code is None:
            self.close_code = code
            self.overflow.set()

    def pop(self) -> Envelope | Control | None:
        """The oldest item of either kind, or None when empty."""
        if self._events and (not self._control or self._events[0][0] < self._control[0][0]):
            _, env = self._events.popleft()
            self.nbytes -= env.nbytes
            return env
        if self._control:
            return self._control.popleft()[1]
        return None
