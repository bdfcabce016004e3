"""Token budgets and budget pauses, shared through Redis.

A request's budget is one Redis hash, so agents of one request running on
several hosts draw from the same budget and the warning fires exactly once
across all of them (see ``lua/budget_add.lua``).

A budget pause with a deadline:

1. the orchestrator marks the pause pending (``lua/budget_open.lua``), then
   publishes ``budget_warning`` so every viewer can answer;
2. any gateway answers with ``lua/budget_answer.lua``: the first answer
   deletes the pending marker and pushes ``<pause_id>:<decision>`` onto the
   request's decision list; later answers find no marker and are refused
   (``no_pending_decision``), so they can never leak into a later pause;
3. the orchestrator blocks on the list (BLPOP) until the deadline, then
   closes the pause with ``lua/budget_timeout.lua``, which applies the
   configured default unless an answer won the race;
4. the orchestrator publishes ``budget_decision`` with who decided.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from redis.asyncio import Redis

from .config import MIN_REQUEST_BUDGET, BudgetConfig
from .events import BudgetDecision, BudgetWarning
from .keys import Keys
from .scripts import script

Decision = Literal["continue", "stop"]
PublishFn: TypeAlias = Callable[[BudgetWarning | BudgetDecision], Awaitable[object]]
"""Publishes one event of the request (``RelayClient.publish`` bound to it)."""
DECISION_LIST_TTL = 300
BLPOP_SLICE = 1.0
"""Longest single BLPOP of a pause, in seconds (below any sane socket timeout)."""


class BudgetStatus(enum.Enum):
    """What adding tokens did to the budget."""

    OK = "ok"
    WARNING = "warning"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The outcome of one :meth:`RequestBudget.add`."""

    status: BudgetStatus
    used: int
    total: int

    @property
    def percentage(self) -> float:
        return 100.0 * self.used / self.total


@dataclass(frozen=True, slots=True)
class PauseOutcome:
    """How a budget pause ended."""

    decision: Decision
    decided_by: Literal["client", "timeout"]


class NoPendingDecision(Exception):
    """An answer arrived when no budget pause was pending for the request."""


class RequestBudget:
    """The token budget of one request, shared by every agent on every host.

    ``total`` defaults to ``budget.default_request_budget``; a total below
    10,000 is raised to 10,000, like the original.
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
    ) -> None:
        self.config = config or BudgetConfig()
        self.redis = redis
        self.keys = keys
        self.request_id = request_id
        self.total = max(MIN_REQUEST_BUDGET, total or self.config.default_request_budget)
        self.ttl_seconds = ttl_seconds
        self._rk = keys.request(request_id)

    async def add(self, tokens: int) -> BudgetState:
        """Add ``tokens`` atomically; returns ok, warning (exactly once) or exhausted."""
        if tokens < 0:
            raise ValueError("tokens: must be >= 0")
        status, used, total = await script("budget_add")(
            self.redis,
            [self._rk.budget],
            [tokens, self.total, self.config.warning_threshold, self.ttl_seconds],
        )
        kind = status.decode() if isinstance(status, bytes) else str(status)
        return BudgetState(BudgetStatus(kind), int(used), int(total))

    async def used(self) -> int:
        """Tokens used so far by the whole request."""
        raw = await self.redis.hget(self._rk.budget, "used")
        return int(raw or 0)

    async def pause(
        self,
        publish: PublishFn,
        state: BudgetState,
        *,
        timeout: float | None = None,
        default: Decision | None = None,
    ) -> PauseOutcome:
        """Pause for a decision: mark pending, publish the warning, wait, publish the outcome.

        ``publish`` publishes one event for this request (``RelayClient.publish``
        bound to the request). Returns the decision and who made it.
        """
        timeout = self.config.decision_timeout_seconds if timeout is None else timeout
        default = default or self.config.timeout_decision
        pause_id = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
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
            # Another agent of this request already paused it; wait on that pause.
            pause_id = json.loads(current)["pause_id"]
        else:
            await publish(
                BudgetWarning(
                    request_id=uuid.UUID(self.request_id),
                    tokens_used=min(state.used, 2**32 - 1),
                    budget_total=min(state.total, 2**32 - 1),
                )
            )
        outcome = await self._await_decision(pause_id, timeout, default)
        if int(opened):
            await publish(
                BudgetDecision(
                    request_id=uuid.UUID(self.request_id),
                    decision=outcome.decision,
                    decided_by=outcome.decided_by,
                )
            )
        return outcome

    async def _await_decision(
        self, pause_id: str, timeout: float, default: Decision
    ) -> PauseOutcome:
        deadline = time.monotonic() + timeout
        prefix = f"{pause_id}:"
        while (left := deadline - time.monotonic()) > 0:
            # BLPOP takes fractional seconds since Redis 6; keep a floor so a
            # tiny remainder does not become "block forever" (0), and a ceiling
            # below the client's socket timeout, which a longer block would hit.
            got = await self.redis.blpop(
                [self._rk.decision], timeout=min(max(left, 0.01), BLPOP_SLICE)
            )
            if got is None:
                continue
            raw = got[1]
            value = raw.decode() if isinstance(raw, bytes) else str(raw)
            if value.startswith(prefix):
                return PauseOutcome(_decision(value[len(prefix) :]), "client")
        result = await script("budget_timeout")(
            self.redis, [self._rk.pending, self._rk.decision], [pause_id]
        )
        kind = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if kind == "client":
            return PauseOutcome(_decision(result[1].decode()), "client")
        return PauseOutcome(default, "timeout")


def _decision(value: str) -> Decision:
    if value == "continue":
        return "continue"
    return "stop"


async def answer_budget(
    redis: Redis, keys: Keys, request_id: str, decision: Decision
) -> dict[str, object]:
    """Answer the request's pending pause; first answer wins.

    Returns the pause that was answered; raises :class:`NoPendingDecision`
    when none is pending.
    """
    rk = keys.request(request_id)
    answered = await script("budget_answer")(
        redis, [rk.pending, rk.decision], [decision, DECISION_LIST_TTL]
    )
    if not answered:
        raise NoPendingDecision(request_id)
    pause: dict[str, object] = json.loads(answered)
    return pause
