"""A request as an async context: its agents, its budget and its pause.

``async with rc.request(rid, budget=200_000) as req:`` registers the
request's cancel token (a cancel of the request id reaches every agent) and
holds the orchestrator's lease on it while it runs. Agents made with
:meth:`Request.agent` publish through it: each batch of an agent's events
adds its tokens to the shared budget (one script call per batch, not per
token) and carries the ``budget_update`` that follows from it.

The budget pause belongs to the request, not to the agent whose tokens
crossed the warning (that agent may be cancelled while the others wait): it
runs in a task the request owns, and every agent of the request on this
host waits for the decision at its next :meth:`Agent.text` and before it
completes. Agents on other hosts learn of the pause from their own adds
(``paused``) and wait on the same decision. ``stop`` and exhaustion *halt*
the request: every running sub-agent is interrupted and announces
``agent_cancelled`` with the reason, and the root agent goes on so that it
can synthesise what completed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from relay.aio import cancel_and_wait, wait_first
from relay.orchestrator.agent import Agent, AgentRef
from relay.orchestrator.batch import PublishBatch
from relay.orchestrator.budget import BudgetState, BudgetStatus, PauseOutcome, RequestBudget
from relay.orchestrator.cancel import CancelToken
from relay.wire.events import (
    AgentEvent,
    BudgetDecision,
    BudgetExhausted,
    BudgetUpdate,
    BudgetWarning,
    ProviderFailover,
    SynthesisStarted,
)

if TYPE_CHECKING:
    from relay.orchestrator.connect import RelayConnection

log = logging.getLogger(__name__)

Outcome = Literal["completed", "cancelled", "stopped", "exhausted"]
U32_MAX = 2**32 - 1


def normalize_id(value: str, name: str) -> str:
    """``value`` as a lowercase hyphenated UUID string; the SDK's one id type.

    >>> normalize_id("3F0C2A6E-0D6B-4C1E-9E4B-8D6A1F2B3C4D", "agent_id")
    '3f0c2a6e-0d6b-4c1e-9e4b-8d6a1f2b3c4d'
    """
    if not isinstance(value, str):
        raise TypeError(f"{name}: ids are str (a UUID's text), got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a UUID") from None


class Request:
    """One request while it runs in this process (made by :meth:`RelayConnection.request`).

    >>> async with rc.request(budget=200_000) as req:
    ...     async with req.agent("Answer the question") as root:
    ...         await root.text("Hello", tokens=1)
    """

    def __init__(self, connection: RelayConnection, request_id: str, *, budget: int | None) -> None:
        self.connection = connection
        self.id = request_id
        """The request id (a lowercase hyphenated UUID string)."""
        config = connection.config
        self.budget = RequestBudget(
            connection.redis,
            connection.keys,
            request_id,
            total=budget,
            config=config.budget,
            calls=connection.client.calls,
        )
        """The request's token budget, shared with every host (the lower layer)."""
        self.batch_window = config.sdk.batch_window_ms / 1000
        self.batch_max = config.sdk.batch_max_events
        self.decision_timeout: float | None = None
        """Seconds a budget pause waits (None: ``budget.decision_timeout_seconds``)."""
        self.decision: PauseOutcome | None = None
        """How the last budget pause ended."""
        self.halted: str | None = None
        """Why the request was halted (a budget stop or exhaustion), if it was."""
        self.events_published = 0
        self.agents: dict[str, Agent] = {}
        """Every agent this process ran in the request, by id."""
        self._running: set[Agent] = set()
        self._outcome: Outcome | None = None
        self._token: CancelToken | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._pause: asyncio.Task[None] | None = None
        self._synthesised = False
        self._exhausted = False

    # ------------------------------------------------------------ public

    def agent(
        self,
        task: str,
        *,
        parent: Agent | AgentRef | None = None,
        agent_id: str | None = None,
        index: int = 0,
        total: int = 1,
    ) -> Agent:
        """An agent of this request, as an async context.

        ``parent`` is a local :class:`Agent`, an :class:`AgentRef` from another
        host, or None for the root. ``index`` and ``total`` place it among the
        siblings spawned together with it (``agent_spawned`` carries them).
        """
        aid = normalize_id(agent_id, "agent_id") if agent_id is not None else str(uuid.uuid4())
        return Agent(self, task, parent=parent, agent_id=aid, index=index, total=total)

    async def publish(self, event: AgentEvent) -> int:
        """Publish one event of the request directly (not batched); returns its seq."""
        seq = await self.connection.client.publish(self.id, event)
        self.events_published += 1
        return seq

    async def synthesis_started(self) -> None:
        """Publish ``synthesis_started`` (once per request and process)."""
        if not self._synthesised:
            self._synthesised = True
            await self.publish(SynthesisStarted(request_id=uuid.UUID(self.id)))

    async def provider_failover(self, from_provider: str, to_provider: str, reason: str) -> None:
        """Publish ``provider_failover`` for the request."""
        await self.publish(
            ProviderFailover(from_provider=from_provider, to_provider=to_provider, reason=reason)
        )

    async def cancel(self, reason: str = "cancelled by user") -> None:
        """Cancel the whole request on every host (a durable tombstone)."""
        await self.connection.cancel(self.id, reason=reason)

    def cancel_local(self, reason: str) -> None:
        """Cancel the request's agents in this process only (no Redis write).

        For a shutting-down orchestrator: its agents announce themselves
        cancelled even while Redis is what is failing.
        """
        if self._token is not None:
            self._token.cancel(reason)

    @property
    def is_cancelled(self) -> bool:
        """True once the request id itself was cancelled."""
        return self._token is not None and self._token.is_cancelled()

    @property
    def outcome(self) -> Outcome:
        """How the request ended so far, as this process saw it."""
        roots = [a for a in self.agents.values() if a.depth == 0]
        if any(a.outcome == "cancelled" for a in roots) or self.is_cancelled:
            return "cancelled"
        return self._outcome or "completed"

    # ------------------------------------------------------------ context

    async def __aenter__(self) -> Request:
        # The request token is the root of every local agent's lineage;
        # registering it honours a cancel of the request written earlier.
        self._token = await self._cancel_token((self.id,))
        lease = self.connection.lease
        if lease is not None:
            # LEASE: the LeaseKeeper (orchestrator liveness) holds the request here.
            try:
                await lease.hold(self.id)
            except BaseException:
                self._token.release()
                raise
        self.connection._opened(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure: BaseException | None = None
        task, self._pause = self._pause, None
        try:
            if task is not None:
                if task.done():
                    failure = task.exception()
                else:
                    # Nobody waits for the decision any more; pause() closes
                    # the pause it opened, so a late answer is refused.
                    await cancel_and_wait(task)
        finally:
            if self._token is not None:
                self._token.release()
            lease = self.connection.lease
            if lease is not None:
                # LEASE: released when the request ends in this process.
                await lease.release(self.id)
            self.connection._closed(self)
        if failure is not None and exc is None:
            raise failure

    # ------------------------------------------------------------ for agents

    async def _cancel_token(self, lineage: tuple[str, ...]) -> CancelToken:
        registry = await self.connection._listening()
        return await registry.token(lineage[-1], lineage=lineage[:-1])

    def _publisher(self, agent: Agent) -> PublishBatch:
        async def publish(events: list[AgentEvent], tokens: int, spent_by: int) -> None:
            state = await self.budget.add(tokens) if tokens else None
            batch = list(events)
            if state is not None:
                # Right after the events that used the tokens, before (say)
                # the agent's terminal event queued behind them.
                batch.insert(
                    spent_by,
                    BudgetUpdate(
                        request_id=uuid.UUID(self.id),
                        tokens_used=min(state.used, U32_MAX),
                        budget_total=min(state.total, U32_MAX),
                        percentage=state.percentage,
                    ),
                )
            if batch:
                await self.connection.client.publish_many(self.id, batch)
                self.events_published += len(batch)
            if state is not None:
                await self._after_add(state)

        return publish

    def _started(self, agent: Agent) -> None:
        self.agents[agent.id] = agent
        self._running.add(agent)
        if self.halted is not None and agent.depth > 0:
            agent._halt(self.halted)

    def _ended(self, agent: Agent) -> None:
        self._running.discard(agent)

    async def wait_while_paused(self) -> None:
        """Return once no budget pause of the request is open (at once if none is)."""
        if not self._gate.is_set():
            await self._gate.wait()

    async def _hold_while_paused(self, stop: asyncio.Event) -> None:
        if not self._gate.is_set():
            await wait_first(self._gate.wait(), stop.wait())

    async def _synthesis_if_halted(self) -> None:
        if self.halted is not None:
            await self.synthesis_started()

    def _partial_summary(self) -> str:
        subs = [a for a in self.agents.values() if a.depth > 0]
        done = sum(1 for a in subs if a.outcome == "completed")
        return f"Partial synthesis ({self.halted}): {done} of {len(subs)} sub-agents completed"

    # ------------------------------------------------------------ budget

    async def _after_add(self, state: BudgetState) -> None:
        if state.status is BudgetStatus.WARNING:
            self._begin_pause(state, join=False)
        elif state.status is BudgetStatus.EXHAUSTED:
            await self._exhaust(state)
        elif state.paused and self._gate.is_set():
            # Another host of this request opened the pause: wait on it too.
            self._begin_pause(state, join=True)

    def _begin_pause(self, state: BudgetState, *, join: bool) -> None:
        if self._pause is not None and not self._pause.done():
            return
        self._gate.clear()
        self._pause = asyncio.create_task(self._run_pause(state, join), name=f"pause-{self.id}")

    async def _run_pause(self, state: BudgetState, join: bool) -> None:
        try:
            if join:
                outcome = await self.budget.join_pause()
                if outcome is None:
                    return  # decided meanwhile
            else:
                outcome = await self.budget.pause(
                    self._publish_budget_event, state, timeout=self.decision_timeout
                )
            self.decision = outcome
            if outcome.decision == "stop":
                self._halt("stopped", f"stopped at the budget warning by {outcome.decided_by}")
        except Exception:
            self._halt("stopped", "budget pause failed")
            raise  # raised again when the request's context exits
        finally:
            self._gate.set()

    async def _publish_budget_event(self, event: BudgetWarning | BudgetDecision) -> None:
        await self.publish(event)

    async def _exhaust(self, state: BudgetState) -> None:
        if self._exhausted:
            return  # every add at or above the total says exhausted; report it once
        self._exhausted = True
        subs = [a for a in self.agents.values() if a.depth > 0]
        self._halt("exhausted", "budget exhausted")
        await self.publish(
            BudgetExhausted(
                request_id=uuid.UUID(self.id),
                tokens_used=min(state.used, U32_MAX),
                budget_total=min(state.total, U32_MAX),
                completed_agents=[uuid.UUID(a.id) for a in subs if a.outcome == "completed"],
                incomplete_agents=[uuid.UUID(a.id) for a in subs if a.outcome != "completed"],
            )
        )

    def _halt(self, outcome: Outcome, reason: str) -> None:
        if self.halted is not None:
            return
        self.halted, self._outcome = reason, outcome
        for agent in list(self._running):
            if agent.depth > 0:
                agent._halt(reason)
