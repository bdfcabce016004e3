"""Sheds connections when the process has more sends to make than time to make them.

The per-connection queues bound memory, but not work: when every client
reads, nothing overflows, and at several times the sends one process can
make (2,000 clients each receiving 100 events/s) the event loop stays
saturated for as long as the load lasts. Every writer takes its turn, and
everything else that needs the loop (an unrelated client's ping, a new
connection's handshake, ``/readyz``, the delivery probe) waits behind all of
them: the gateway looks dead exactly when it is busiest, and the balancer's
health check takes it out, which moves the whole load to the next gateway.

Lag-based admission, as load balancers do it: a task asks the loop for a
short sleep every ``gateway.overload_check_interval`` and measures how late
it wakes. While that lag stays above ``gateway.overload_lag_seconds``, each
check closes the connections furthest behind (the ones with the most events
queued, ``gateway.overload_shed_fraction`` of those with events waiting, at
least one) with 1013, try again later. Those are the clients that would
cost the most to catch up; they reconnect with ``after_seq`` (to another
gateway, behind a balancer) and lose nothing, since the history has what
they missed. Connections with only replies queued are never chosen.

Overflow policy named here: ``shed deepest backlog first, close 1013``.
"""

from __future__ import annotations

import asyncio
import logging

from relay.aio import stop_task
from relay.config import GatewayConfig
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import CLOSE_TRY_AGAIN_LATER, SendQueue, SendTurns

log = logging.getLogger(__name__)


def deepest(queues: set[SendQueue], fraction: float) -> list[SendQueue]:
    """The share ``fraction`` (at least one) of ``queues`` with events that hold the most."""
    with_events = [q for q in queues if len(q) and q.close_code is None]
    if not with_events:
        return []
    count = max(1, int(len(with_events) * fraction))
    with_events.sort(key=len, reverse=True)
    return with_events[:count]


class OverloadShedder:
    """Owned by the app's lifespan: :meth:`start`, then :meth:`close`."""

    def __init__(self, config: GatewayConfig, turns: SendTurns, metrics: Metrics) -> None:
        self.lag_limit = config.overload_lag_seconds
        self.interval = config.overload_check_interval
        self.fraction = config.overload_shed_fraction
        self.turns = turns
        self.metrics = metrics
        self.lag = 0.0
        """How late the loop woke at the last check (seconds)."""
        self._task: asyncio.Task[None] | None = None
        self._shedding = False

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
            self.check(loop.time() - asked - self.interval)

    def check(self, lag: float) -> int:
        """Act on one lag measurement; returns how many connections were shed."""
        self.lag = lag
        if lag <= self.lag_limit:
            if self._shedding:
                self._shedding = False
                log.warning("event loop lag back to %.2fs: no longer shedding", lag)
            return 0
        victims = deepest(self.turns.busy, self.fraction)
        for queue in victims:
            queue.fail(CLOSE_TRY_AGAIN_LATER)
        if victims:
            self.metrics.connections_shed.inc(len(victims))
            if not self._shedding:
                self._shedding = True
                log.warning(
                    "event loop %.2fs late (limit %.2fs): more sends than this process can "
                    "make; closing the connections furthest behind with 1013",
                    lag,
                    self.lag_limit,
                )
        return len(victims)
