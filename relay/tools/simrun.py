"""Executing a simulated plan with the orchestrator SDK: the part worth copying.

Each agent of an :class:`~relay.tools.simplan.AgentPlan` runs inside
``req.agent(...)`` / ``agent.child(...)``, so the SDK does the protocol:
the cancel token registered before ``agent_spawned``, text deltas batched
with their ``budget_update``, the pause at the budget warning, and exactly
one terminal event per agent. A cancel of an agent, an ancestor or the
request interrupts the agent wherever it waits (here: the sleep that stands
in for the LLM) and the context announces ``agent_cancelled``.

What is left here is what a real orchestrator decides itself: the order of
the work, parallel batches (a task group owns the children), and not
starting new sub-agents once the request is halted by the budget.
"""

from __future__ import annotations

import asyncio

from relay.orchestrator.agent import Agent
from relay.orchestrator.request import Request
from relay.tools.simplan import AgentPlan, Batch


async def run_agent(
    req: Request,
    plan: AgentPlan,
    parent: Agent | None,
    *,
    index: int,
    total: int,
    delta_interval: float,
    max_depth: int,
) -> None:
    """Run ``plan``'s agent (and its sub-agents) to its end."""
    async with req.agent(
        plan.task, parent=parent, agent_id=plan.agent_id, index=index, total=total
    ) as agent:
        if not await _stream(req, agent, plan, range(plan.split), delta_interval):
            return
        if plan.hits_depth_limit:
            # The agent wanted one more level; the platform refuses it.
            await agent.depth_limit_reached(plan.depth + 1, max_depth)
        for batch in plan.batches:
            await _run_batch(req, batch, agent, delta_interval=delta_interval, max_depth=max_depth)
        if req.halted is not None:
            return  # the root synthesises what completed (the SDK's partial summary)
        if plan.is_root:
            await req.synthesis_started()
        if await _stream(req, agent, plan, range(plan.split, len(plan.texts)), delta_interval):
            text = "".join(plan.texts).strip()
            agent.result = f"{len(plan.texts)} notes: {text[0].upper()}{text[1:]}."


async def _run_batch(
    req: Request, batch: Batch, parent: Agent, *, delta_interval: float, max_depth: int
) -> None:
    total = len(batch.agents)

    async def child(plan: AgentPlan, index: int) -> None:
        # No new work once the budget halted the request: the parent's
        # buffered tokens are counted first, and a pause holds the spawn
        # until the decision, so a "stop" is seen here.
        await parent.flush()
        await req.wait_while_paused()
        if req.halted is None:
            await run_agent(
                req, plan, parent, index=index, total=total,
                delta_interval=delta_interval, max_depth=max_depth,
            )  # fmt: skip

    if not batch.parallel:
        for index, plan in enumerate(batch.agents):
            await child(plan, index)
        return
    # The task group owns the children: it waits for all of them and cancels
    # the rest if one fails.
    async with asyncio.TaskGroup() as group:
        for index, plan in enumerate(batch.agents):
            group.create_task(child(plan, index), name=f"agent-{plan.agent_id}")


async def _stream(
    req: Request, agent: Agent, plan: AgentPlan, indices: range, delta_interval: float
) -> bool:
    """Stream the deltas at ``indices``; False when the request was halted meanwhile."""
    for i in indices:
        # Stands in for the LLM's next chunk; a cancel interrupts this sleep.
        await asyncio.sleep(delta_interval)
        await req.wait_while_paused()
        if req.halted is not None:
            return False
        if plan.memory_fact is not None and i == plan.memory_at:
            await agent.memory(plan.memory_fact)
        await agent.text(plan.texts[i], tokens=plan.tokens[i])
    return True
