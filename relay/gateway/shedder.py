"""Sheds connections when the process has more sends to make than time to make them.

The per-connection queues bound memory, but not work: when every client
reads, nothing overflows, and at several times the sends one process can
make (2,000 clients each receiving 100 events/s) the process falls further
behind for as long as the load lasts. Every writer takes its turn, and
everything else that needs the loop (an unrelated client's ping, a new
connection's handshake, ``/readyz``, the delivery probe) waits behind all of
them: the gateway looks dead exactly when it is busiest, and the balancer's
health check takes it out, which moves the whole load to the next gateway.

Every ``gateway.overload_check_interval`` the shedder reads two lags, each
measured in this process, on its own clock:

* **loop lag**: how late a short sleep wakes;
* **delivery lag**: the median age of the oldest queued event over the
  connections with something queued, counted only while writers queue for
  their turn (there is more to send than CPU to send it: one slow client
  on an idle gateway is the overflow policy's business, not this one's).

When the loop lag passes ``gateway.overload_lag_seconds``, each check closes
the connections furthest behind (the ones with the most events queued,
``gateway.overload_shed_fraction`` of those with events waiting, at least
one) with 1013, try again later. When the delivery lag passes it and is not
falling at least half as fast as time passes (a backlog that drains by
itself needs no shedding), the share closed is what the last second's sends
fell short of what was queued since the last shed (``1 - taken/offered``,
at least the fraction above, at most ``MAX_SHED``), and the next such shed
waits ``SETTLE_S``: the lag falls only after
the work behind it is done, and shedding at every check until it did kept
closing for seconds. Those are the clients that would cost the most to
catch up; they reconnect with ``after_seq`` (to another gateway, behind a
balancer) and lose nothing, since the history has what they missed.
Connections with only replies queued are never chosen.

The pub/sub reader's backlog (:meth:`PubSubLink.backlog`, in ``/readyz``)
is deliberately not a signal: it is a per-event cost that closing
connections does not lower, and the age of a probe still on its way grows
until the probe arrives, so it cannot show a backlog that is already
draining: with it, a 20,000-event burst to ten clients that the queues'
``drop_oldest`` policy was absorbing closed nine of them.

Overflow policy named here: ``shed deepest backlog first, close 1013``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from relay.aio import stop_task
from relay.config import GatewayConfig
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import CLOSE_TRY_AGAIN_LATER, SendQueue, SendTurns

log = logging.getLogger(__name__)

SHED_REASON = "gateway overloaded; reconnect with after_seq"
"""The close frame's reason for a shed connection (code 1013)."""
RATE_WINDOW_S = 1.0
"""Over how long the share of queued events that were not sent is measured."""
SETTLE_S = 1.0
"""After a shed on the delivery lag, how long before it is judged again."""
MAX_SHED = 0.5
"""At most this share of the connections with events waiting goes in one shed.
The share not sent is measured while the loop is also doing everything else
(and, right after a shed, closing the connections shed), so it runs high:
with a cap of 0.9, 2,000 clients went down to 39 where a few hundred could
be served. Halving at most, a second apart, overshoots by at most half."""


def deepest(queues: set[SendQueue], fraction: float) -> list[SendQueue]:
    """The share ``fraction`` (at least one) of ``queues`` with events that hold the most."""
    with_events = [q for q in queues if len(q) and q.close_code is None]
    if not with_events:
        return []
    count = max(1, int(len(with_events) * fraction))
    with_events.sort(key=len, reverse=True)
    return with_events[:count]


def delivery_lag(queues: set[SendQueue], now: float) -> float:
    """The median age (seconds) of the oldest queued event over ``queues`` that hold one."""
    ages = sorted(now - t for q in queues if (t := q.oldest()) is not None)
    return ages[len(ages) // 2] if ages else 0.0


class OverloadShedder:
    """Owned by the app's lifespan: :meth:`start`, then :meth:`close`."""

    def __init__(
        self,
        config: GatewayConfig,
        turns: SendTurns,
        metrics: Metrics,
    ) -> None:
        self.lag_limit = config.overload_lag_seconds
        self.interval = config.overload_check_interval
        self.fraction = config.overload_shed_fraction
        self.turns = turns
        self.metrics = metrics
        self.lag = 0.0
        """How late the loop woke at the last check (seconds)."""
        self.behind = 0.0
        """The delivery lag at the last check (seconds)."""
        self._task: asyncio.Task[None] | None = None
        self._shedding = False
        self._last_shed = float("-inf")
        self._samples: deque[tuple[float, int, int]] = deque()
        """(time, ``turns.offered``, ``turns.taken``) over the last ``RATE_WINDOW_S``."""

    async def start(self) -> None:
        """Start measuring (nothing to do when ``overload_lag_seconds`` is 0)."""
        if self.lag_limit > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="relay-overload-shedder")

    async def close(self) -> None:
        """Stop measuring and wait for the task."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            self.check(loop.time() - asked - self.interval, self.measure_behind())

    def measure_behind(self) -> float:
        """The delivery lag while writers queue for turns, else 0."""
        if self.turns.queued:
            return delivery_lag(self.turns.busy, time.monotonic())
        return 0.0

    def excess(self) -> float:
        """The share of what was queued over the last second that was not sent:
        ``1 - taken/offered`` (0 when nothing was queued)."""
        if len(self._samples) < 2:
            return 0.0
        (_, offered0, taken0), (_, offered1, taken1) = self._samples[0], self._samples[-1]
        offered = offered1 - offered0
        return 0.0 if offered <= 0 else max(0.0, 1.0 - (taken1 - taken0) / offered)

    def check(self, lag: float, behind: float = 0.0, now: float | None = None) -> int:
        """Act on one measurement; returns how many connections were shed."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, self.turns.offered, self.turns.taken))
        while now - self._samples[0][0] > RATE_WINDOW_S and len(self._samples) > 2:
            self._samples.popleft()
        previous, self.behind, self.lag = self.behind, behind, lag
        limit = self.lag_limit
        if lag > limit:
            fraction = self.fraction  # the loop itself is late: shed at every check
        elif behind > limit and behind > previous - self.interval / 2:
            if now - self._last_shed < SETTLE_S:
                return 0  # the last shed has not had time to show its effect yet
            # As much as the last second's sends fell short of what was
            # queued, in one go: the lag drains only after the work
            # behind them is done, so a tenth at every check kept closing
            # for seconds (and kept every client waiting meanwhile) to end
            # at about the same count.
            fraction = min(MAX_SHED, max(self.fraction, self.excess()))
        else:
            if self._shedding:
                self._shedding = False
                log.warning("event loop lag %.2fs, %.2fs behind: no longer shedding", lag, behind)
            return 0
        victims = deepest(self.turns.busy, fraction)
        for queue in victims:
            queue.fail(CLOSE_TRY_AGAIN_LATER, SHED_REASON)
        if victims:
            self._last_shed = now
            # What was not sent before this shed says nothing about after it.
            self._samples.clear()
            self.metrics.connections_shed.inc(len(victims))
            if not self._shedding:
                self._shedding = True
                log.warning(
                    "event loop %.2fs late, %.2fs behind (limit %.2fs): more sends than this "
                    "process can make; closing the connections furthest behind with 1013",
                    lag,
                    behind,
                    limit,
                )
        return len(victims)
