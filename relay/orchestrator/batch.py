"""One agent's outbox: its events published in order, text deltas in batches.

A token-by-token LLM stream must not cost one Redis round trip per token.
An :class:`Outbox` holds what an agent wants published and hands it to a
publish function in batches: a batch leaves when the window
(``[sdk] batch_window_ms``) has passed since its first event, when it holds
``batch_max_events`` events, or at once when someone waits for it
(:meth:`Outbox.flush`, or an event added with ``wait=True``: spawns,
terminal events and every non-text event, so a viewer never waits a window
for them). One task per outbox publishes, one batch at a time, so the order
of an agent's events is the order they were added.

Bounded: at most ``max_events`` events wait in the buffer while a batch is
being published. The overflow policy is *block the producer*: an ``add`` that
finds the buffer full waits until the publisher takes it.

Cancelling a caller that waits (an agent interrupted by a cancel) never
cancels a publish in flight: publishing happens in the outbox's own task, so
a batch is either published whole or reported failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from relay.aio import cancel_and_wait
from relay.wire.events import AgentEvent

PublishBatch = Callable[[list[AgentEvent], int, int], Awaitable[None]]
"""Publishes one batch: its events (in order), the tokens they used, and how many
of its first events used them (the budget update belongs right after those)."""


class Outbox:
    """Buffers one agent's events and publishes them in order, in batches.

    ``publish(events, tokens, spent_by)`` is called with at most ``max_events`` events
    (possibly none, when only tokens were spent) from the outbox's own task.
    A failure of ``publish`` is kept and raised by every later
    :meth:`add`, :meth:`flush` and :meth:`close`: nothing is dropped silently.

    >>> outbox = Outbox(publish, window=0.005, max_events=256, name="agent 3f0c")
    >>> await outbox.add(AgentTextDelta(agent_id=aid, text="Hel"), tokens=1)
    >>> await outbox.add(AgentTextDelta(agent_id=aid, text="lo"), tokens=1)
    >>> await outbox.flush()   # one publish carried both deltas
    >>> await outbox.close()
    """

    def __init__(self, publish: PublishBatch, *, window: float, max_events: int, name: str) -> None:
        if max_events < 1:
            raise ValueError("max_events: must be >= 1")
        self.window = window
        self.max_events = max_events
        self.name = name
        self._publish = publish
        self._events: list[AgentEvent | None] = []
        self._tokens: list[int] = []
        self._added = 0
        self._done = 0
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """Publishes made so far (for tests and benchmarks)."""

    async def add(self, event: AgentEvent | None, tokens: int = 0, *, wait: bool = False) -> None:
        """Queue ``event`` (None: tokens only) with the ``tokens`` it used.

        Returns once it is buffered, or with ``wait=True`` once it (and
        everything queued before it) is published.
        """
        self._check()
        while len(self._events) >= self.max_events:
            # Full: block the producer until the publisher takes the buffer.
            self._urgent.set()
            await self._next_change()
            self._check()
        self._events.append(event)
        self._tokens.append(tokens)
        self._added += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay-outbox {self.name}")
        self._wake.set()
        if wait or len(self._events) >= self.max_events:
            self._urgent.set()
        if wait:
            await self._until(self._added)

    async def flush(self) -> None:
        """Publish everything queued so far; returns when it is in Redis."""
        self._check()
        if self._done < self._added:
            self._urgent.set()
            await self._until(self._added)

    async def close(self) -> None:
        """Flush, then stop the publishing task. Raises a publish failure, if any."""
        try:
            await self.flush()
        finally:
            task, self._task = self._task, None
            if task is not None:
                await cancel_and_wait(task)

    @property
    def pending(self) -> int:
        """Events queued and not yet published."""
        return self._added - self._done

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _next_change(self) -> None:
        await self._changed.wait()

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until(self, count: int) -> None:
        while self._done < count:
            self._check()
            await self._next_change()
        self._check()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._urgent.is_set() and self.window > 0:
                # The window opens with the first event of the batch.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.window):
                        await self._urgent.wait()
            take = min(len(self._events), self.max_events)
            events: list[AgentEvent] = []
            tokens = spent_by = 0
            for event, cost in zip(self._events[:take], self._tokens[:take], strict=True):
                if event is not None:
                    events.append(event)
                if cost:
                    tokens += cost
                    spent_by = len(events)
            del self._events[:take], self._tokens[:take]
            if not self._events:
                self._wake.clear()
                self._urgent.clear()
            self._signal()  # room in the buffer for a blocked producer
            try:
                await self._publish(events, tokens, spent_by)
            except Exception as exc:
                # Kept for the agent: raised by its next add/flush/close.
                self._failure = exc
                self._signal()
                return
            self.batches += 1
            self._done += take
            self._signal()
