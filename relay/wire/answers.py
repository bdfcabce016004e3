"""Recording a budget decision: the one place gateways, the CLI and the SDK answer a pause.

A budget pause (``relay:T:req:{R}:pending``) is answered by
``lua/budget_answer.lua``: the first answer deletes the pending marker,
records ``client:<decision>`` for the pause id in ``relay:T:req:{R}:decided``
and pushes a wake-up onto ``relay:T:req:{R}:decision``; later answers are
refused. The orchestrator's side of the pause is
:class:`relay.orchestrator.budget.RequestBudget`.
"""

from __future__ import annotations

import json
from typing import Literal

from redis.asyncio import Redis

from relay.wire.keys import Keys
from relay.wire.scripts import script

Decision = Literal["continue", "stop"]
"""A budget decision: go on, or halt the request."""
DECISION_LIST_TTL = 300
"""Seconds the wake-up list and the decided hash of a pause outlive it."""


class NoPendingDecision(Exception):
    """An answer arrived when no budget pause (or another one) was pending.

    >>> raise NoPendingDecision("3f0c...")
    """


async def answer_budget(
    redis: Redis,
    keys: Keys,
    request_id: str,
    decision: Decision,
    pause_id: str | None = None,
) -> dict[str, object]:
    """Answer the request's pending pause; first answer wins.

    With ``pause_id`` the answer applies only to that pause, so an answer
    meant for a pause that already ended can never reach a later one.
    Returns the pause that was answered; raises :class:`NoPendingDecision`
    when none (or another one) is pending.

    >>> pause = await answer_budget(rc.redis, rc.keys, request_id, "continue")
    >>> pause["pause_id"]
    '9b1d...'
    """
    rk = keys.request(request_id)
    answered = await script("budget_answer")(
        redis,
        [rk.pending, rk.decision, rk.decided],
        [decision, DECISION_LIST_TTL, pause_id or ""],
    )
    if not answered:
        raise NoPendingDecision(request_id)
    pause: dict[str, object] = json.loads(answered)
    return pause
