"""relay: a Redis-backed distributed event relay for AI agent platforms.

Orchestrators publish AgentEvents with :class:`RelayClient`; gateways built by
:func:`create_app` forward them to WebSocket clients; cancels and budget
decisions travel back through Redis (:class:`CancelRegistry`,
:class:`RequestBudget`).
"""

from relay.config import ConfigError, GlobalConfig, load_config
from relay.orchestrator.budget import (
    BudgetState,
    BudgetStatus,
    NoPendingDecision,
    PauseOutcome,
    RequestBudget,
)
from relay.orchestrator.cancel import CancelRegistry, CancelToken, request_cancel
from relay.orchestrator.client import OrchestratorLost, Published, PublishError, RelayClient
from relay.orchestrator.lease import LeaseKeeper
from relay.wire.events import AgentEvent, parse_event
from relay.wire.keys import Keys

__all__ = [
    "AgentEvent",
    "BudgetState",
    "BudgetStatus",
    "CancelRegistry",
    "CancelToken",
    "ConfigError",
    "GlobalConfig",
    "Keys",
    "LeaseKeeper",
    "NoPendingDecision",
    "OrchestratorLost",
    "PauseOutcome",
    "PublishError",
    "Published",
    "RelayClient",
    "RequestBudget",
    "create_app",
    "load_config",
    "parse_event",
    "request_cancel",
]


def __getattr__(name: str) -> object:
    # The gateway (Starlette, uvicorn, Prometheus) is imported only when asked
    # for, so orchestrators using the SDK do not pay for it.
    if name == "create_app":
        from relay.gateway import create_app

        return create_app
    raise AttributeError(f"module 'relay' has no attribute {name!r}")
