"""Sending an event from the hub's own stack when its writer has nothing else to do.

A writer that waits for work costs a task wake per event it is given: the
event's ``Event.set``, a callback, the task's step through its coroutine
frames, the wait's new future. With one event fanned out to many idle
connections that wake, not the send, was most of relay's cost per delivery
above the ceiling's (which writes every socket from one loop, like
``websockets.broadcast``). So when a connection's writer is parked on an
empty queue and the event is the next one of its request, the hub writes the
frame itself (:meth:`~relay.gateway.writer.OrderedWriter.offer_direct`).

An ASGI ``send`` is a coroutine, but a server's send to a writable socket
completes without suspending (uvicorn's waits on an Event that is set unless
the transport paused writing). :func:`start` runs it up to its first
suspension; almost always it finishes there. When it does suspend (the
socket's buffer is full), the rest of it is handed to the connection's writer
as a :class:`Resumed` awaitable, which the writer awaits before it sends
anything else, so frames stay in order.

Direct sends share one budget per pass of the event loop
(:class:`PassBudget`), as the writers' turns do: a burst of events to
thousands of connections still leaves room in every pass for pings, new
connections and the delivery probe; past the budget events take the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from relay.gateway.metrics import LATENCY_SAMPLE, Metrics


class Resumed:
    """The rest of a send that suspended: awaiting it drives it to the end.

    Delegates to the send's own iterator the way ``yield from`` would: what it
    yields (the future it waits for) goes to the awaiting task, what the task
    sends or throws (a result, a cancellation) goes back into it.
    """

    __slots__ = ("_it", "_next")

    def __init__(self, it: Generator[Any, Any, Any], first: Any) -> None:
        self._it = it
        self._next = first

    def __await__(self) -> Generator[Any, Any, None]:
        it, out = self._it, self._next
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                it.close()
                raise
            except BaseException as exc:  # a cancellation: into the send, never swallowed
                try:
                    out = it.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    out = it.send(sent)
                except StopIteration:
                    return

    def close(self) -> None:
        """Abandon the send (its connection is gone)."""
        self._it.close()


def start(awaitable: Awaitable[Any]) -> Resumed | None:
    """Run ``awaitable`` until it first suspends.

    None: it finished. A :class:`Resumed`: it is waiting, and whoever owns the
    rest must await it. An exception it raises before suspending propagates.
    """
    it = awaitable.__await__()
    try:
        first = it.send(None)
    except StopIteration:
        return None
    return Resumed(it, first)


PER_SECOND = 20_000
"""Direct sends per second, for the whole process. Past it events take the
queues again: under that much load the writers have several events queued
each and send them back to back, which costs less per frame than one direct
send per event per connection (measured: see docs/BENCHMARKS.md)."""


PASS_BYTES = 512 * 1024
"""Direct sends per pass of the loop, in bytes too: a pass of 1,024 frames of
1 KB held pings back three times longer than the writers' turns did
(benchmarks/overload.py)."""


class PassBudget:
    """Direct sends left in this pass of the event loop, for the whole process.

    The first send of a pass schedules the refill (``call_soon`` runs it at
    the start of the next pass), which also adds the pass's direct sends to
    the delivery counters: once per pass, not once per writer (a prometheus
    counter takes a lock on every update, and one event reaches a thousand
    writers in a pass).
    """

    __slots__ = (
        "_armed",
        "_bytes",
        "_clock",
        "_metrics",
        "_second_ends",
        "_second_left",
        "_seen",
        "_sent",
        "bytes_left",
        "frames",
        "left",
        "per_second",
    )

    def __init__(
        self,
        frames: int,
        per_second: int = PER_SECOND,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.frames = max(1, frames)
        self._clock = clock
        self.left = self.frames
        self.bytes_left = PASS_BYTES
        self.per_second = per_second
        self._second_left = per_second
        self._second_ends = 0.0
        self._armed = False
        self._metrics: Metrics | None = None
        self._sent = 0
        self._bytes = 0
        self._seen = 0
        """Direct sends ever (the latency sample's count; ``_sent`` restarts each pass)."""

    def take(self, nbytes: int) -> bool:
        """Spend one direct send of ``nbytes``; False when this pass or this
        second has none left."""
        if self.left <= 0 or self.bytes_left <= 0:
            return False
        if not self._armed:
            self._arm()
        if self._second_left <= 0:
            return False
        self._second_left -= 1
        self.left -= 1
        self.bytes_left -= nbytes
        return True

    def _arm(self) -> None:
        # Once per pass: the refill, and the clock read of the per-second window.
        self._armed = True
        loop = asyncio.get_running_loop()
        loop.call_soon(self._refill)
        now = loop.time() if self._clock is None else self._clock()
        if now >= self._second_ends:
            self._second_ends = now + 1.0
            self._second_left = self.per_second

    def count(self, metrics: Metrics, nbytes: int, ts: int) -> None:
        """Count one direct send of ``nbytes`` published at ``ts`` (ms) into
        ``metrics``, added up until the pass ends."""
        if metrics is not self._metrics:
            self._flush()
            self._metrics = metrics
        self._sent += 1
        self._bytes += nbytes
        self._seen += 1
        if not self._armed:
            self._arm()
        if self._seen % LATENCY_SAMPLE == 0 and ts:
            metrics.observe_latency(ts)

    def _flush(self) -> None:
        if self._sent and self._metrics is not None:
            self._metrics.events_out.inc(self._sent)
            self._metrics.events_direct.inc(self._sent)
            self._metrics.bytes_out.inc(self._bytes)
        self._sent = self._bytes = 0

    def _refill(self) -> None:
        self.left = self.frames
        self.bytes_left = PASS_BYTES
        self._armed = False
        self._flush()
