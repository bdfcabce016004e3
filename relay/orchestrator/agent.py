"""An agent as an async context: the protocol of one agent, done for the caller.

``async with req.agent(task) as agent:`` registers the agent's cancel token
(before anything is published, so a cancel sent by someone who saw the spawn
always reaches it), publishes ``agent_spawned``, and at the end publishes
exactly one terminal event:

* ``agent_completed`` with the tokens the agent spent and its duration, when
  the block ends normally;
* ``agent_failed`` when the block raises (the exception is re-raised);
* ``agent_cancelled`` when the agent was cancelled: by a cancel of itself or
  of any ancestor, on any host, or by the request's budget stopping.

A cancel *interrupts* the block: the task that entered the context gets an
``asyncio.CancelledError`` at the ``await`` it is blocked in (an LLM call, a
tool, a sleep), in the same step as the cancel arrives. The context turns
that cancellation into ``agent_cancelled`` and swallows only its own: a
cancellation of the task from anywhere else (shutdown, a task group) is
announced too and propagates, the way ``asyncio.timeout`` tells its own
cancellation from others (``Task.uncancel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

from relay.orchestrator.batch import Outbox
from relay.orchestrator.cancel import CancelToken
from relay.wire.events import (
    RESULT_SUMMARY_MAX_BYTES,
    AgentCancelled,
    AgentCompleted,
    AgentEvent,
    AgentFailed,
    AgentSpawned,
    AgentTextDelta,
    CycleDetected,
    DepthLimitReached,
    MemoryCreated,
    ProviderFailover,
)

if TYPE_CHECKING:
    from relay.orchestrator.request import Request

T = TypeVar("T")
Outcome = Literal["completed", "failed", "cancelled"]
U32_MAX = 2**32 - 1
EXTERNAL_REASON = "interrupted: the orchestrator cancelled the agent's task"


class AgentCancelledError(asyncio.CancelledError):
    """Raised by :meth:`Agent.raise_if_cancelled` (and :meth:`Agent.text`) once the
    agent is cancelled. A ``CancelledError``, so ``except Exception`` does not
    swallow it; the agent's context catches it and publishes ``agent_cancelled``.

    >>> async with req.agent("Crunch numbers") as agent:
    ...     for row in rows:            # CPU-bound: no await to interrupt
    ...         agent.raise_if_cancelled()
    ...         crunch(row)
    """


@dataclass(frozen=True, slots=True)
class AgentRef:
    """Where an agent sits in its request's tree, to hand work to another host.

    ``lineage`` is the request id, then every ancestor, then the agent. Send
    it (it is a list of str) to the process that runs the children and pass
    it as ``parent=``: a cancel of any id in it reaches them there.

    >>> ref = root.ref                           # on host A
    >>> payload = list(ref.lineage)              # send it to host B
    >>> parent = AgentRef(tuple(payload))        # on host B
    >>> async with req.agent("Sub-task", parent=parent) as child: ...
    """

    lineage: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.lineage) < 2:
            raise ValueError("lineage: needs the request id and at least the agent's own id")

    @property
    def request_id(self) -> str:
        """The request the agent belongs to."""
        return self.lineage[0]

    @property
    def agent_id(self) -> str:
        """The agent's own id."""
        return self.lineage[-1]

    @property
    def depth(self) -> int:
        """0 for a root agent, 1 for its children, ..."""
        return len(self.lineage) - 2


async def uninterruptible(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile, then
    re-raise that cancellation: a terminal event is never half published."""
    task = asyncio.ensure_future(aw)
    deferred = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            deferred = True
    if deferred:
        raise asyncio.CancelledError
    return result


class Agent:
    """One agent of a request, as an async context (made by :meth:`Request.agent`).

    >>> async with req.agent("Research prices") as agent:
    ...     async for chunk in llm.stream(prompt):
    ...         await agent.text(chunk.text, tokens=chunk.tokens)
    ...     agent.result = "Prices rose 3%"
    """

    def __init__(
        self,
        request: Request,
        task: str,
        *,
        parent: Agent | AgentRef | None,
        agent_id: str,
        index: int,
        total: int,
    ) -> None:
        self.request = request
        self.task = task
        self.id = agent_id
        """The agent id (a lowercase hyphenated UUID string)."""
        self._parent = parent
        base = parent.lineage if parent is not None else (request.id,)
        if base[0] != request.id:
            raise ValueError(f"parent: belongs to request {base[0]}, not {request.id}")
        self.lineage: tuple[str, ...] = (*base, agent_id)
        """The request id, every ancestor, then this agent."""
        self.depth = len(self.lineage) - 2
        """0 for a root agent."""
        self.index, self.total = index, total
        self.tokens_used = 0
        """Tokens passed to :meth:`text` and :meth:`use_tokens` so far."""
        self.result: str | None = None
        """The ``result_summary`` of ``agent_completed`` (default: the start of the text)."""
        self.outcome: Outcome | None = None
        """How the agent ended, once its context has exited."""
        self._uuid = uuid.UUID(agent_id)
        self._prefix: list[str] = []
        self._prefix_bytes = 0
        self._token: CancelToken | None = None
        self._outbox: Outbox | None = None
        self._task: asyncio.Task[object] | None = None
        self._armed = False
        self._interrupted = False
        self._halt_reason: str | None = None
        self._stop = asyncio.Event()
        self._remove_callback: Callable[[], None] = lambda: None
        self._started = 0.0

    # ------------------------------------------------------------ identity

    @property
    def parent_id(self) -> str | None:
        """The parent agent's id; None for a root agent."""
        return self.lineage[-2] if self.depth > 0 else None

    @property
    def ref(self) -> AgentRef:
        """This agent's place in the tree, for children on another host."""
        return AgentRef(self.lineage)

    # ------------------------------------------------------------ cancellation

    @property
    def is_cancelled(self) -> bool:
        """True once the agent is cancelled or stopped by the budget. No I/O."""
        return self._stop_reason() is not None

    @property
    def cancel_reason(self) -> str | None:
        """Why it was cancelled (the ``reason`` of its ``agent_cancelled``)."""
        return self._stop_reason()

    @property
    def cancelled_by(self) -> str | None:
        """The id whose cancel reached this agent: itself, an ancestor or the request."""
        if self._token is not None and self._token.is_cancelled():
            return self._token.cancelled_by
        return self.request.id if self._halt_reason is not None else None

    def raise_if_cancelled(self) -> None:
        """Raise :class:`AgentCancelledError` if the agent is cancelled."""
        reason = self._stop_reason()
        if reason is not None:
            raise AgentCancelledError(reason)

    async def cancelled(self) -> str:
        """Wait until the agent is cancelled; returns the reason."""
        await self._stop.wait()
        return self._stop_reason() or "cancelled"

    async def cancel(self, reason: str = "cancelled by user") -> None:
        """Cancel this agent and its descendants on every host (a durable tombstone)."""
        await self.request.connection.cancel(self.id, reason=reason)

    # ------------------------------------------------------------ events

    async def text(self, chunk: str, *, tokens: int = 0) -> None:
        """Stream a text delta that cost ``tokens`` (counted in the request's budget).

        Deltas are batched (``[sdk] batch_window_ms``); this returns once the
        chunk is queued. While the request's budget pause is open this waits
        for the decision, so the agent stops spending at the warning.
        """
        if tokens < 0:
            raise ValueError("tokens: must be >= 0")
        self.raise_if_cancelled()
        await self.request.wait_while_paused()
        self.tokens_used += tokens
        if self._prefix_bytes <= RESULT_SUMMARY_MAX_BYTES:
            self._prefix.append(chunk)
            self._prefix_bytes += len(chunk.encode())
        await self._box.add(AgentTextDelta(agent_id=self._uuid, text=chunk), tokens)

    async def use_tokens(self, tokens: int) -> None:
        """Count ``tokens`` spent without text (a tool call, a hidden prompt)."""
        if tokens < 0:
            raise ValueError("tokens: must be >= 0")
        self.raise_if_cancelled()
        await self.request.wait_while_paused()
        self.tokens_used += tokens
        await self._box.add(None, tokens)

    async def memory(self, fact: str) -> None:
        """Publish ``memory_created``: the agent learned ``fact``."""
        await self.publish(MemoryCreated(agent_id=self._uuid, fact=fact))

    async def depth_limit_reached(self, attempted_depth: int, max_depth: int) -> None:
        """Publish ``depth_limit_reached``: a sub-agent was refused at ``attempted_depth``."""
        await self.publish(
            DepthLimitReached(
                agent_id=self._uuid, attempted_depth=attempted_depth, max_depth=max_depth
            )
        )

    async def cycle_detected(self, description: str) -> None:
        """Publish ``cycle_detected`` for this agent."""
        await self.publish(CycleDetected(agent_id=self._uuid, cycle_description=description))

    async def provider_failover(self, from_provider: str, to_provider: str, reason: str) -> None:
        """Publish ``provider_failover``: this agent's model calls moved to another provider."""
        await self.publish(
            ProviderFailover(from_provider=from_provider, to_provider=to_provider, reason=reason)
        )

    async def publish(self, event: AgentEvent) -> None:
        """Publish any event in order with this agent's text; returns once it is in Redis."""
        self.raise_if_cancelled()
        await self._box.add(event, wait=True)

    async def flush(self) -> None:
        """Publish every delta queued so far; returns once they are in Redis."""
        if self._outbox is not None:
            await self._outbox.flush()

    def child(
        self, task: str, *, agent_id: str | None = None, index: int = 0, total: int = 1
    ) -> Agent:
        """A sub-agent of this one (an async context, like :meth:`Request.agent`)."""
        return self.request.agent(task, parent=self, agent_id=agent_id, index=index, total=total)

    @property
    def _box(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("use the agent inside its `async with` block")
        return self._outbox

    # ------------------------------------------------------------ lifecycle

    def _stop_reason(self) -> str | None:
        if self._token is not None and self._token.is_cancelled():
            return self._token.reason or "cancelled"
        return self._halt_reason

    def _on_stop(self) -> None:
        self._stop.set()
        if self._armed and not self._interrupted and self._task is not None:
            self._interrupted = True
            self._task.cancel(f"agent {self.id} cancelled")

    def _halt(self, reason: str) -> None:
        """Stop this agent for the request (budget stop or exhaustion), on this host."""
        if self._halt_reason is None and not self.is_cancelled:
            self._halt_reason = reason
            self._on_stop()

    async def __aenter__(self) -> Agent:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an agent context needs to run inside an asyncio task")
        self._task = task
        req = self.request
        if isinstance(self._parent, Agent):
            # The parent's text so far comes before the child appears.
            await self._parent.flush()
        # Registered before agent_spawned is published: whoever sees the spawn
        # and cancels is sure to reach the token (tombstones are checked here).
        self._token = await req._cancel_token(self.lineage)
        self._remove_callback = self._token.on_cancel(self._on_stop)
        self._outbox = Outbox(
            req._publisher(self), window=req.batch_window, max_events=req.batch_max, name=self.id
        )
        self._started = time.monotonic()
        spawned = AgentSpawned(
            agent_id=self._uuid,
            parent_id=uuid.UUID(self.parent_id) if self.parent_id else None,
            task_description=self.task,
            depth=self.depth,
            index=self.index,
            total=self.total,
        )
        try:
            await self._outbox.add(spawned, wait=True)
        except BaseException:
            # The spawn may have reached Redis: end the agent so no viewer
            # shows it running for ever, then let the failure through.
            await uninterruptible(self._end("cancelled", EXTERNAL_REASON))
            raise
        req._started(self)
        self._armed = True
        if self._stop.is_set():
            self._on_stop()  # cancelled before it started: interrupt at the first await
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._armed = False
        task = self._task
        assert task is not None
        remaining = task.cancelling()
        if self._interrupted:
            # Our interrupt may not be delivered yet (the block ended without
            # another await): take it here, not in the caller. Whether the
            # cancellation goes on is decided by the count, below.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            remaining = task.uncancel()
        reason = self._stop_reason()
        external = reason is None and isinstance(exc, asyncio.CancelledError)
        if reason is not None or external:
            outcome: Outcome = "cancelled"
            detail = reason or EXTERNAL_REASON
        elif exc is not None:
            outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
        else:
            outcome, detail = "completed", ""
        await uninterruptible(self._end(outcome, detail))
        if outcome != "cancelled" or external:
            return False  # a failure (or someone else's cancellation) goes on
        if remaining > 0:
            # Someone else cancelled the task too (an ancestor agent of the
            # same task, a shutdown): let the cancellation go on to them.
            if isinstance(exc, asyncio.CancelledError):
                return False
            raise asyncio.CancelledError
        return True  # our own cancellation ends here: the caller goes on

    async def _end(self, outcome: Outcome, detail: str) -> None:
        """Publish the terminal event (after everything queued) and let go of the token."""
        box = self._box
        try:
            if outcome == "completed":
                await box.flush()
                # No agent completes while the request is paused: viewers see
                # the decision before the results it governs.
                await self.request._hold_while_paused(self._stop)
                if (reason := self._stop_reason()) is not None:
                    outcome, detail = "cancelled", reason
            event: AgentEvent
            if outcome == "completed":
                if self.depth == 0:
                    await self.request._synthesis_if_halted()
                event = AgentCompleted(
                    agent_id=self._uuid,
                    result_summary=self._summary(),
                    tokens_used=min(self.tokens_used, U32_MAX),
                    duration_ms=int((time.monotonic() - self._started) * 1000),
                )
            elif outcome == "cancelled":
                event = AgentCancelled(agent_id=self._uuid, reason=detail)
            else:
                event = AgentFailed(agent_id=self._uuid, error=detail, will_retry=False)
            await box.add(event, wait=True)
            self.outcome = outcome
        finally:
            self._remove_callback()
            if self._token is not None:
                self._token.release()
            self.request._ended(self)
            await box.close()

    def _summary(self) -> str:
        if self.result is not None:
            return self.result
        if self.depth == 0 and self.request.halted is not None:
            return self.request._partial_summary()
        return "".join(self._prefix).strip()
