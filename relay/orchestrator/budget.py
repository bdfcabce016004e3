"""Token budgets and budget pauses, shared through Redis.

A request's budget is one Redis hash, so agents of one request running on
several hosts draw from the same budget and the warning fires exactly once
across all of them (``lua/budget_add.lua``).

A budget pause with a deadline:

1. the orchestrator marks the pause pending (``lua/budget_open.lua``), then
   publishes ``budget_warning`` so every viewer can answer;
2. any gateway answers with ``lua/budget_answer.lua``: the first answer
   deletes the pending marker, records ``client:<decision>`` for the pause id
   in the ``decided`` hash and pushes a wake-up; later answers find no marker
   (or, when they name a ``pause_id``, a different one) and are refused with
   ``no_pending_decision``, so they can never leak into a later pause;
3. every waiter of the pause (the agent that opened it, and agents on other
   hosts that learn of it from ``add()``) blocks on the wake-up list in short
   slices and reads the decision from the hash, so all of them see the same
   answer; at the deadline ``lua/budget_timeout.lua`` closes the pause with
   the configured default unless an answer won the race;
4. the orchestrator that opened it publishes ``budget_decision`` with who
   decided.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.config import MIN_REQUEST_BUDGET, BudgetConfig

# Answers are recorded by relay.wire.answers (shared with the gateway and the
# CLI); re-exported here because this is where orchestrators look for them.
from relay.wire.answers import DECISION_LIST_TTL, Decision, NoPendingDecision, answer_budget
from relay.wire.events import BudgetDecision, BudgetWarning
from relay.wire.keys import Keys
from relay.wire.scripts import Calls, as_text, script

log = logging.getLogger(__name__)

__all__ = [
    "DECISION_LIST_TTL",
    "BudgetState",
    "BudgetStatus",
    "Decision",
    "NoPendingDecision",
    "PauseOutcome",
    "RequestBudget",
    "answer_budget",
]

PublishFn: TypeAlias = Callable[[BudgetWarning | BudgetDecision], Awaitable[object]]
"""Publishes one event of the request (``RelayClient.publish`` bound to it)."""
BLPOP_SLICE = 1.0
"""Longest single BLPOP of a pause, in seconds (below any sane socket timeout)."""
U32_MAX = 2**32 - 1


class BudgetStatus(enum.Enum):
    """What adding tokens did to the budget.

    >>> (await budget.add(500)).status
    <BudgetStatus.OK: 'ok'>
    """

    OK = "ok"
    WARNING = "warning"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The outcome of one :meth:`RequestBudget.add`.

    >>> state = await budget.add(500)
    >>> state.used, state.total, state.percentage
    (500, 10000, 5.0)
    """

    status: BudgetStatus
    used: int
    total: int
    paused: bool = False
    """A budget pause of the request is open (maybe opened on another host)."""

    @property
    def percentage(self) -> float:
        return 100.0 * self.used / self.total


@dataclass(frozen=True, slots=True)
class PauseOutcome:
    """How a budget pause ended.

    >>> outcome = await budget.pause(publish, state)
    >>> outcome.decision, outcome.decided_by
    ('continue', 'client')
    """

    decision: Decision
    decided_by: Literal["client", "timeout"]


class RequestBudget:
    """The token budget of one request, shared by every agent on every host.

    ``total`` defaults to ``budget.default_request_budget``; a total below
    10,000 is raised to 10,000, like the original. With ``calls`` (the
    client's :class:`~relay.orchestrator.autopipe.AutoPipeline`), adds made by
    concurrent agents share round trips.

    >>> budget = RequestBudget(rc.redis, rc.keys, request_id, total=200_000)
    >>> state = await budget.add(1_200)
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        request_id: str,
        *,
        total: int | None = None,
        config: BudgetConfig | None = None,
        ttl_seconds: int = 7 * 24 * 3600,
        calls: Calls | None = None,
    ) -> None:
        self.config = config or BudgetConfig()
        self.redis = redis
        self._calls = calls
        self.keys = keys
        self.request_id = request_id
        self.total = max(MIN_REQUEST_BUDGET, total or self.config.default_request_budget)
        self.ttl_seconds = ttl_seconds
        self._rk = keys.request(request_id)

    async def add(self, tokens: int) -> BudgetState:
        """Add ``tokens`` atomically; returns ok, warning (exactly once) or exhausted.

        ``paused`` on the result says a budget pause of this request is open:
        call :meth:`join_pause` before spending more.
        """
        if tokens < 0:
            raise ValueError("tokens: must be >= 0")
        keys = [self._rk.budget, self._rk.pending]
        args = [tokens, self.total, self.config.warning_threshold, self.ttl_seconds]
        add = script("budget_add")
        if self._calls is not None:
            # Concurrent agents' adds share round trips (with their publishes).
            status, used, total, paused = await add.call_in(self._calls, keys, args)
        else:
            status, used, total, paused = await add(self.redis, keys, args)
        kind = as_text(status)
        return BudgetState(BudgetStatus(kind), int(used), int(total), bool(int(paused)))

    async def used(self) -> int:
        """Tokens used so far by the whole request."""
        raw = await self.redis.hget(self._rk.budget, "used")
        return int(raw or 0)

    async def pending(self) -> dict[str, Any] | None:
        """The open pause of this request, if any."""
        raw = await self.redis.get(self._rk.pending)
        return json.loads(raw) if raw is not None else None

    async def pause(
        self,
        publish: PublishFn,
        state: BudgetState,
        *,
        timeout: float | None = None,
        default: Decision | None = None,
    ) -> PauseOutcome:
        """Pause for a decision: mark pending, publish the warning, wait, publish the outcome.

        If another agent already paused the request, this waits on that pause
        instead and publishes nothing. If this call is cancelled or fails, the
        pause it opened is closed with the default, so no answer is
        acknowledged for a pause nobody waits on any more.
        """
        timeout = self.config.decision_timeout_seconds if timeout is None else timeout
        default = default or self.config.timeout_decision
        now_ms = int(time.time() * 1000)
        pause_id = uuid.uuid4().hex
        pause = {
            "pause_id": pause_id,
            "tokens_used": state.used,
            "budget_total": state.total,
            "opened_ts": now_ms,
            "deadline_ts": now_ms + int(timeout * 1000),
            "timeout_decision": default,
        }
        opened, current = await script("budget_open")(
            self.redis,
            [self._rk.pending, self._rk.decision],
            [json.dumps(pause), int(timeout * 1000) + 30_000],
        )
        if not int(opened):
            return await self._wait(json.loads(current))
        try:
            await publish(
                BudgetWarning(
                    request_id=uuid.UUID(self.request_id),
                    tokens_used=min(state.used, U32_MAX),
                    budget_total=min(state.total, U32_MAX),
                )
            )
            outcome = await self._await_decision(pause_id, time.monotonic() + timeout, default)
        except BaseException:
            # Shielded: even while this task is being cancelled, the pause
            # must not stay open with nobody left to read its answer.
            await asyncio.shield(self._close(pause_id, default))
            raise
        await publish(
            BudgetDecision(
                request_id=uuid.UUID(self.request_id),
                decision=outcome.decision,
                decided_by=outcome.decided_by,
            )
        )
        return outcome

    async def join_pause(self) -> PauseOutcome | None:
        """Wait until the request's open pause is decided; None when none is open.

        This is how agents that did not open the pause (on this host or
        another) honour it.
        """
        current = await self.pending()
        return None if current is None else await self._wait(current)

    async def _wait(self, pause: dict[str, Any]) -> PauseOutcome:
        left = max(0.0, int(pause.get("deadline_ts", 0)) / 1000 - time.time())
        default = _decision(str(pause.get("timeout_decision", self.config.timeout_decision)))
        return await self._await_decision(str(pause["pause_id"]), time.monotonic() + left, default)

    async def _await_decision(
        self, pause_id: str, deadline: float, default: Decision
    ) -> PauseOutcome:
        while (left := deadline - time.monotonic()) > 0:
            try:
                # BLPOP takes fractional seconds since Redis 6; keep a floor so
                # a tiny remainder does not become "block forever" (0), and a
                # ceiling below the client's socket timeout. A wake-up only says
                # "look": the decision is read from the hash, so every waiter of
                # the pause sees it, not only the one that popped the wake-up.
                await self.redis.blpop(
                    [self._rk.decision], timeout=min(max(left, 0.01), BLPOP_SLICE)
                )
                done = await self.redis.hget(self._rk.decided, pause_id)
            except RedisError as exc:
                # A hiccup must not end the pause early: retry until the deadline.
                log.warning(
                    "waiting for a budget decision: %s",
                    exc,
                    extra={"request_id": self.request_id},
                )
                await asyncio.sleep(min(0.2, left))
                continue
            if done is not None:
                return _outcome(done)
        return await self._close(pause_id, default)

    async def _close(self, pause_id: str, default: Decision) -> PauseOutcome:
        """Close the pause with ``default`` unless it was answered; returns the outcome."""
        result = await script("budget_timeout")(
            self.redis,
            [self._rk.pending, self._rk.decision, self._rk.decided],
            [pause_id, default, DECISION_LIST_TTL],
        )
        by, decision = (as_text(v) for v in result)
        return PauseOutcome(_decision(decision), "client" if by == "client" else "timeout")


def _decision(value: str) -> Decision:
    return "continue" if value == "continue" else "stop"


def _outcome(raw: bytes | str) -> PauseOutcome:
    text = as_text(raw)
    by, _, decision = text.partition(":")
    return PauseOutcome(_decision(decision), "client" if by == "client" else "timeout")
