"""The runtime of one simulated request: agents, cancels and the budget gate.

:class:`RequestRun` executes an :class:`~relay.tools.simplan.AgentPlan` against
Redis. It is the part of :mod:`relay.tools.simulate` worth copying into a real
orchestrator; the plan only stands in for the LLM.

* Each agent holds a :class:`CancelToken` registered *before* its
  ``agent_spawned`` is published, so a cancel sent by someone who saw that
  event always reaches it. A cancel reaches the agent's whole subtree; every
  agent in it announces ``agent_cancelled`` itself, children before parents.
* Agents wait before each delta with the cancel token in hand, so a cancel
  interrupts a sleep or a budget pause at once instead of after it.
* The budget pause belongs to the request, not to the agent whose tokens
  crossed the threshold (that agent may be cancelled while the others wait):
  it runs in a task owned by the run, and agents wait at a gate until the
  decision is in. "stop" and exhaustion *halt* the run: running sub-agents
  stop (announced as cancelled, with the reason), and the root synthesises
  what completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Literal

from relay.aio import cancel_and_wait, wait_first
from relay.orchestrator.budget import BudgetState, BudgetStatus, PauseOutcome, RequestBudget
from relay.orchestrator.cancel import CancelToken
from relay.orchestrator.client import RelayClient
from relay.tools.simplan import AgentPlan, Batch
from relay.wire.events import (
    AgentCompleted,
    AgentEvent,
    AgentSpawned,
    AgentTextDelta,
    BudgetDecision,
    BudgetExhausted,
    BudgetUpdate,
    BudgetWarning,
    DepthLimitReached,
    MemoryCreated,
    SynthesisStarted,
)

Outcome = Literal["completed", "cancelled", "stopped", "exhausted"]
U32_MAX = 2**32 - 1


class RequestRun:
    """The mutable state of one request while its agents run.

    ``delta_interval`` is the wait before each text delta, ``decision_timeout``
    the length of a budget pause (None: the budget's configured default) and
    ``max_depth`` the depth limit reported by ``depth_limit_reached``.
    """

    def __init__(
        self,
        client: RelayClient,
        budget: RequestBudget,
        *,
        delta_interval: float,
        decision_timeout: float | None,
        max_depth: int,
    ) -> None:
        self.client = client
        self.budget = budget
        self.delta_interval = delta_interval
        self.decision_timeout = decision_timeout
        self.max_depth = max_depth
        self.rid = budget.request_id
        self.published = 0
        self.spawned: dict[str, AgentPlan] = {}
        self.completed: set[str] = set()
        self.cancelled: set[str] = set()
        self.decision: PauseOutcome | None = None
        self.halt: Outcome | None = None
        self.halt_reason = ""
        self._halted = asyncio.Event()
        # Set while agents may go on; cleared while a budget pause waits.
        self._gate = asyncio.Event()
        self._gate.set()
        self._pause: asyncio.Task[None] | None = None
        self._synthesis_published = False

    # ------------------------------------------------------------ publishing

    async def publish(self, *events: AgentEvent) -> None:
        """Publish events of this request atomically, in order (one round trip)."""
        await self.client.publish_many(self.rid, list(events))
        self.published += len(events)

    async def _publish_budget_event(self, event: BudgetWarning | BudgetDecision) -> None:
        await self.publish(event)

    # ------------------------------------------------------------ agents

    async def spawn(self, plan: AgentPlan, parent: CancelToken, *, index: int, total: int) -> None:
        """Register ``plan``'s token, announce the spawn, run the agent to its end."""
        # Register first: a client may cancel the agent as soon as it sees
        # agent_spawned, and only a registered token is sure to be reached.
        token = await parent.child(plan.agent_id)
        try:
            self.spawned[plan.agent_id] = plan
            await self.publish(_spawned(plan, index, total))
        except BaseException:
            token.release()  # run_agent releases it from here on
            raise
        await self.run_agent(plan, token)

    async def run_agent(self, plan: AgentPlan, token: CancelToken) -> None:
        """Run one agent and publish how it ended (completed or cancelled)."""
        started = time.monotonic()
        used = 0
        try:
            finished, used = await self._work(plan, token)
            if token.is_cancelled() or (not finished and not plan.is_root):
                # Cancelled, or a sub-agent cut short by a stop or exhaustion.
                reason = None if token.is_cancelled() else self.halt_reason
                await token.announce(self.client, self.rid, reason)
                self.published += 1
                self.cancelled.add(plan.agent_id)
                return
            if plan.is_root and not self._synthesis_published:
                await self._synthesis()
            summary = self._summary(plan, finished)
            duration = int((time.monotonic() - started) * 1000)
            await self.publish(
                AgentCompleted(
                    agent_id=uuid.UUID(plan.agent_id),
                    result_summary=summary,
                    tokens_used=min(used, U32_MAX),
                    duration_ms=duration,
                )
            )
            self.completed.add(plan.agent_id)
        finally:
            token.release()

    async def _work(self, plan: AgentPlan, token: CancelToken) -> tuple[bool, int]:
        """Stream, run the sub-agent batches, stream again; (finished?, tokens used)."""
        finished, used = await self._stream(plan, token, range(plan.split))
        if not finished:
            return False, used
        if plan.hits_depth_limit:
            # The agent wanted one more level; the platform refuses it.
            await self.publish(
                DepthLimitReached(
                    agent_id=uuid.UUID(plan.agent_id),
                    attempted_depth=plan.depth + 1,
                    max_depth=self.max_depth,
                )
            )
        for batch in plan.batches:
            if self._stopped(token):
                return False, used
            await self._run_batch(batch, token)
        if self._stopped(token):
            return False, used
        if plan.is_root:
            await self._synthesis()
        finished, more = await self._stream(plan, token, range(plan.split, len(plan.texts)))
        if finished:
            # No agent completes while the request is paused: a viewer sees
            # the decision before the results it governs. Work already done
            # is kept even if the decision is "stop".
            await self._proceed(token, delay=0)
        return finished and not token.is_cancelled(), used + more

    async def _run_batch(self, batch: Batch, parent: CancelToken) -> None:
        total = len(batch.agents)
        if not batch.parallel:
            for index, child in enumerate(batch.agents):
                if self._stopped(parent):
                    return
                await self.spawn(child, parent, index=index, total=total)
            return
        tokens = [await parent.child(child.agent_id) for child in batch.agents]
        try:
            for child in batch.agents:
                self.spawned[child.agent_id] = child
            # One publish for the whole batch: viewers see it appear at once.
            await self.publish(*(_spawned(c, i, total) for i, c in enumerate(batch.agents)))
        except BaseException:
            for token in tokens:
                token.release()
            raise
        # The task group owns the children: it waits for all of them and
        # cancels the rest if one fails.
        async with asyncio.TaskGroup() as group:
            for child, token in zip(batch.agents, tokens, strict=True):
                group.create_task(self.run_agent(child, token), name=f"agent-{child.agent_id}")

    async def _stream(
        self, plan: AgentPlan, token: CancelToken, indices: range
    ) -> tuple[bool, int]:
        used = 0
        aid = uuid.UUID(plan.agent_id)
        for i in indices:
            if not await self._proceed(token, delay=self.delta_interval):
                return False, used
            if plan.memory_fact is not None and i == plan.memory_at:
                await self.publish(MemoryCreated(agent_id=aid, fact=plan.memory_fact))
            state = await self.budget.add(plan.tokens[i])
            used += plan.tokens[i]
            await self.publish(
                AgentTextDelta(agent_id=aid, text=plan.texts[i]), _update(self.rid, state)
            )
            if state.status is BudgetStatus.WARNING:
                self._begin_pause(state)
            elif state.status is BudgetStatus.EXHAUSTED:
                await self._exhaust(state)
            elif state.paused and self._gate.is_set():
                # Another orchestrator process of this request paused it.
                self._begin_pause(state, join=True)
        return True, used

    async def _proceed(self, token: CancelToken, *, delay: float) -> bool:
        """Wait ``delay`` and for any pause to end; False when the agent must stop."""
        if delay > 0:
            # Sleep, but wake up at once when cancelled.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await token.wait()
        if not self._gate.is_set() and not self._stopped(token):
            await wait_first(self._gate.wait(), self._halted.wait(), token.wait())
        return not self._stopped(token)

    def _stopped(self, token: CancelToken) -> bool:
        return token.is_cancelled() or self.halt is not None

    async def _synthesis(self) -> None:
        self._synthesis_published = True
        await self.publish(SynthesisStarted(request_id=uuid.UUID(self.rid)))

    def _summary(self, plan: AgentPlan, finished: bool) -> str:
        if finished:
            text = "".join(plan.texts).strip()
            return f"{len(plan.texts)} notes: {text[0].upper()}{text[1:]}."
        subs = [a for a in self.spawned if a != plan.agent_id]
        done = sum(1 for a in subs if a in self.completed)
        return f"Partial synthesis ({self.halt_reason}): {done} of {len(subs)} sub-agents completed"

    # ------------------------------------------------------------ budget

    def _begin_pause(self, state: BudgetState, *, join: bool = False) -> None:
        # The pause belongs to the request, not to the agent that crossed the
        # threshold: that agent may be cancelled while the others still wait.
        if self._pause is not None and not self._pause.done():
            return
        self._gate.clear()
        self._pause = asyncio.create_task(self._run_pause(state, join), name=f"pause-{self.rid}")

    async def _run_pause(self, state: BudgetState, join: bool) -> None:
        try:
            if join:
                joined = await self.budget.join_pause()
                if joined is None:
                    return  # decided meanwhile
                outcome = joined
            else:
                outcome = await self.budget.pause(
                    self._publish_budget_event, state, timeout=self.decision_timeout
                )
            self.decision = outcome
            if outcome.decision == "stop":
                self._halt("stopped", f"stopped at the budget warning by {outcome.decided_by}")
        except Exception:
            self._halt("stopped", "budget pause failed")
            raise  # surfaces from close()
        finally:
            self._gate.set()

    async def _exhaust(self, state: BudgetState) -> None:
        if self.halt == "exhausted":
            return  # every add at or above the total says exhausted; report it once
        subs = [a for a in self.spawned if not self.spawned[a].is_root]
        self._halt("exhausted", "budget exhausted")
        await self.publish(
            BudgetExhausted(
                request_id=uuid.UUID(self.rid),
                tokens_used=min(state.used, U32_MAX),
                budget_total=min(state.total, U32_MAX),
                completed_agents=[uuid.UUID(a) for a in subs if a in self.completed],
                incomplete_agents=[uuid.UUID(a) for a in subs if a not in self.completed],
            )
        )

    def _halt(self, outcome: Outcome, reason: str) -> None:
        if self.halt is None:
            self.halt, self.halt_reason = outcome, reason
            self._halted.set()

    async def close(self) -> None:
        """End the run: abandon a pause nobody waits for, surface its failure."""
        task, self._pause = self._pause, None
        if task is None:
            return
        if not task.done():
            # Only a cancelled or exhausted run gets here: its decision is moot.
            # Close the pause too, so a late answer is refused instead of acked.
            # pause() closes the pause it opened when cancelled, so a late
            # answer is refused instead of acknowledged.
            await cancel_and_wait(task)
            return
        await task  # re-raises a failure of the pause

    def outcome(self, root: AgentPlan) -> Outcome:
        """How the request ended."""
        if root.agent_id in self.cancelled:
            return "cancelled"
        return self.halt or "completed"


def _spawned(plan: AgentPlan, index: int, total: int) -> AgentSpawned:
    return AgentSpawned(
        agent_id=uuid.UUID(plan.agent_id),
        parent_id=uuid.UUID(plan.parent_id) if plan.parent_id else None,
        task_description=plan.task,
        depth=plan.depth,
        index=index,
        total=total,
    )


def _update(request_id: str, state: BudgetState) -> BudgetUpdate:
    return BudgetUpdate(
        request_id=uuid.UUID(request_id),
        tokens_used=min(state.used, U32_MAX),
        budget_total=min(state.total, U32_MAX),
        percentage=state.percentage,
    )
