"""relay: a Redis-backed distributed event relay for AI agent platforms.

Orchestrators connect with :func:`connect` and run requests and agents as
async contexts; gateways built by :func:`create_app` forward the events to
WebSocket clients; cancels and budget decisions travel back through Redis.
The lower layers (:class:`RelayClient`, :class:`CancelRegistry`,
:class:`RequestBudget`) stay public for other shapes.

>>> import relay
>>> async with relay.connect("redis://localhost:6379") as rc:
...     async with rc.request(budget=200_000) as req:
...         async with req.agent("Research prices") as agent:
...             await agent.text("Prices rose", tokens=2)
"""

from typing import TYPE_CHECKING

from relay.config import (
    BudgetConfig,
    CancelConfig,
    ConfigError,
    GatewayConfig,
    GlobalConfig,
    HistoryConfig,
    RedisConfig,
    SdkConfig,
    load_config,
)
from relay.orchestrator.agent import Agent, AgentCancelledError, AgentRef
from relay.orchestrator.budget import (
    BudgetState,
    BudgetStatus,
    PauseOutcome,
    RequestBudget,
)
from relay.orchestrator.cancel import CancelRegistry, CancelToken, request_cancel
from relay.orchestrator.client import OrchestratorLost, Published, PublishError, RelayClient
from relay.orchestrator.connect import LeaseHook, RelayConnection, connect
from relay.orchestrator.lease import LeaseKeeper
from relay.orchestrator.request import Request
from relay.wire.answers import Decision, NoPendingDecision, answer_budget
from relay.wire.events import (
    AgentCancelled,
    AgentCompleted,
    AgentEvent,
    AgentFailed,
    AgentSpawned,
    AgentTextDelta,
    BudgetDecision,
    BudgetExhausted,
    BudgetUpdate,
    BudgetWarning,
    CycleDetected,
    DepthLimitReached,
    MemoryCreated,
    ProviderFailover,
    SynthesisStarted,
    WorkflowRunCompleted,
    WorkflowRunFailed,
    WorkflowRunPaused,
    WorkflowRunStarted,
    WorkflowStepCompleted,
    WorkflowStepFailed,
    WorkflowStepStarted,
    parse_event,
)
from relay.wire.keys import Keys

if TYPE_CHECKING:
    # Seen by type checkers only: at run time the gateway (Starlette,
    # uvicorn, Prometheus) is imported on first use, by __getattr__ below.
    from relay.gateway.app import create_app

__all__ = [
    "Agent",
    "AgentCancelled",
    "AgentCancelledError",
    "AgentCompleted",
    "AgentEvent",
    "AgentFailed",
    "AgentRef",
    "AgentSpawned",
    "AgentTextDelta",
    "BudgetConfig",
    "BudgetDecision",
    "BudgetExhausted",
    "BudgetState",
    "BudgetStatus",
    "BudgetUpdate",
    "BudgetWarning",
    "CancelConfig",
    "CancelRegistry",
    "CancelToken",
    "ConfigError",
    "CycleDetected",
    "Decision",
    "DepthLimitReached",
    "GatewayConfig",
    "GlobalConfig",
    "HistoryConfig",
    "Keys",
    "LeaseHook",
    "LeaseKeeper",
    "MemoryCreated",
    "NoPendingDecision",
    "OrchestratorLost",
    "PauseOutcome",
    "ProviderFailover",
    "PublishError",
    "Published",
    "RedisConfig",
    "RelayClient",
    "RelayConnection",
    "Request",
    "RequestBudget",
    "SdkConfig",
    "SynthesisStarted",
    "WorkflowRunCompleted",
    "WorkflowRunFailed",
    "WorkflowRunPaused",
    "WorkflowRunStarted",
    "WorkflowStepCompleted",
    "WorkflowStepFailed",
    "WorkflowStepStarted",
    "answer_budget",
    "connect",
    "create_app",
    "load_config",
    "parse_event",
    "request_cancel",
]


def __getattr__(name: str) -> object:
    # The gateway is imported only when asked for, so orchestrators using
    # the SDK do not pay for it and importing relay has no side effects.
    if name == "create_app":
        from relay.gateway.app import create_app

        return create_app
    raise AttributeError(f"module 'relay' has no attribute {name!r}")
