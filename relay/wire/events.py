"""AgentEvent variants: the server-to-client events of the wire contract.

Every variant is a pydantic model whose ``type`` field is the snake_case
variant name, so the union below is discriminated on ``type`` and serialises
to exactly the JSON the original process sent: the same field names, ``null``
for an absent optional value (the key is always present), UUIDs as hyphenated
lowercase strings.

On the wire each event travels inside a *frame*: the event object plus
``request_id``, ``seq`` and ``ts`` at the top level (see :class:`EventFrame`).
The frame is assembled atomically in Redis by the publish script, so it is
never built in Python on the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

U8 = Annotated[int, Field(ge=0, le=255)]
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

RESULT_SUMMARY_MAX_BYTES = 200


def _schema_description(schema: dict[str, Any], cls: type[Any]) -> None:
    # The JSON Schema (``relay schema``) describes each event with its
    # docstring's prose; the Python example after it is for Python readers.
    if isinstance(description := schema.get("description"), str):
        schema["description"] = description.split("\n\n>>>", 1)[0].strip()


class _Event(BaseModel):
    # Events from orchestrators are strict about unknown fields: a typo in a
    # field name is refused before it reaches Redis instead of being dropped.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_schema_description)


class AgentSpawned(_Event):
    """An agent started (``parent_id`` None for the root).

    >>> AgentSpawned(agent_id=aid, parent_id=None, task_description="Research",
    ...              depth=0, index=0, total=1)
    """

    type: Literal["agent_spawned"] = "agent_spawned"
    agent_id: UUID
    parent_id: UUID | None
    task_description: str
    depth: U8
    index: U32
    total: U32


class AgentTextDelta(_Event):
    """A chunk of an agent's streamed text.

    >>> AgentTextDelta(agent_id=aid, text="Hello")
    """

    type: Literal["agent_text_delta"] = "agent_text_delta"
    agent_id: UUID
    text: str


class AgentCompleted(_Event):
    """An agent finished; ``result_summary`` is cut at 200 bytes (plus "...").

    >>> AgentCompleted(agent_id=aid, result_summary="Done", tokens_used=812, duration_ms=5400)
    """

    type: Literal["agent_completed"] = "agent_completed"
    agent_id: UUID
    result_summary: str
    tokens_used: U32
    duration_ms: U64

    @field_validator("result_summary")
    @classmethod
    def _truncate(cls, value: str) -> str:
        # The original cut summaries at 200 bytes (on a character boundary)
        # and appended "...".
        raw = value.encode()
        if len(raw) <= RESULT_SUMMARY_MAX_BYTES:
            return value
        return raw[:RESULT_SUMMARY_MAX_BYTES].decode(errors="ignore") + "..."


class AgentFailed(_Event):
    """An agent ended with an error.

    >>> AgentFailed(agent_id=aid, error="TimeoutError: model call", will_retry=False)
    """

    type: Literal["agent_failed"] = "agent_failed"
    agent_id: UUID
    error: str
    will_retry: bool


class AgentCancelled(_Event):
    """An agent stopped because it (or an ancestor, or its request) was cancelled.

    >>> AgentCancelled(agent_id=aid, reason="cancelled by user")
    """

    type: Literal["agent_cancelled"] = "agent_cancelled"
    agent_id: UUID
    reason: str


class BudgetUpdate(_Event):
    """Tokens used by the whole request so far (``percentage`` is 0-100).

    >>> BudgetUpdate(request_id=rid, tokens_used=4000, budget_total=10000, percentage=40.0)
    """

    type: Literal["budget_update"] = "budget_update"
    request_id: UUID
    tokens_used: U32
    budget_total: U32
    percentage: float


class BudgetWarning(_Event):
    """The request crossed its warning threshold; a budget pause is open.

    >>> BudgetWarning(request_id=rid, tokens_used=8000, budget_total=10000)
    """

    type: Literal["budget_warning"] = "budget_warning"
    request_id: UUID
    tokens_used: U32
    budget_total: U32


class BudgetExhausted(_Event):
    """The request used its whole budget; the listed sub-agents did or did not finish.

    >>> BudgetExhausted(request_id=rid, tokens_used=10000, budget_total=10000,
    ...                 completed_agents=[], incomplete_agents=[aid])
    """

    type: Literal["budget_exhausted"] = "budget_exhausted"
    request_id: UUID
    tokens_used: U32
    budget_total: U32
    completed_agents: list[UUID]
    incomplete_agents: list[UUID]


class DepthLimitReached(_Event):
    """An agent tried to spawn a sub-agent below the depth limit.

    >>> DepthLimitReached(agent_id=aid, attempted_depth=4, max_depth=3)
    """

    type: Literal["depth_limit_reached"] = "depth_limit_reached"
    agent_id: UUID
    attempted_depth: U8
    max_depth: U8


class CycleDetected(_Event):
    """An agent was refused because it would repeat an ancestor's task.

    >>> CycleDetected(agent_id=aid, cycle_description="A -> B -> A")
    """

    type: Literal["cycle_detected"] = "cycle_detected"
    agent_id: UUID
    cycle_description: str


class SynthesisStarted(_Event):
    """The root agent started combining its sub-agents' results.

    >>> SynthesisStarted(request_id=rid)
    """

    type: Literal["synthesis_started"] = "synthesis_started"
    request_id: UUID


class MemoryCreated(_Event):
    """An agent stored a fact in long-term memory.

    >>> MemoryCreated(agent_id=aid, fact="User prefers sources")
    """

    type: Literal["memory_created"] = "memory_created"
    agent_id: UUID
    fact: str


class ProviderFailover(_Event):
    """Model calls moved from one provider to another.

    >>> ProviderFailover(from_provider="openai", to_provider="anthropic", reason="429")
    """

    type: Literal["provider_failover"] = "provider_failover"
    from_provider: str
    to_provider: str
    reason: str


class WorkflowRunStarted(_Event):
    """A workflow run started.

    >>> WorkflowRunStarted(run_id=run, workflow_name="nightly", trigger_type="cron")
    """

    type: Literal["workflow_run_started"] = "workflow_run_started"
    run_id: UUID
    workflow_name: str
    trigger_type: str


class WorkflowStepStarted(_Event):
    """A step of a workflow run started.

    >>> WorkflowStepStarted(run_id=run, step_id="s1", step_name="fetch", step_type="http")
    """

    type: Literal["workflow_step_started"] = "workflow_step_started"
    run_id: UUID
    step_id: str
    step_name: str
    step_type: str


class WorkflowStepCompleted(_Event):
    """A step of a workflow run finished.

    >>> WorkflowStepCompleted(run_id=run, step_id="s1", step_name="fetch", duration_ms=120)
    """

    type: Literal["workflow_step_completed"] = "workflow_step_completed"
    run_id: UUID
    step_id: str
    step_name: str
    duration_ms: U64


class WorkflowStepFailed(_Event):
    """A step of a workflow run failed.

    >>> WorkflowStepFailed(run_id=run, step_id="s1", step_name="fetch", error="404",
    ...                    will_retry=True)
    """

    type: Literal["workflow_step_failed"] = "workflow_step_failed"
    run_id: UUID
    step_id: str
    step_name: str
    error: str
    will_retry: bool


class WorkflowRunCompleted(_Event):
    """A workflow run finished.

    >>> WorkflowRunCompleted(run_id=run, workflow_name="nightly", duration_ms=9000,
    ...                      steps_completed=3)
    """

    type: Literal["workflow_run_completed"] = "workflow_run_completed"
    run_id: UUID
    workflow_name: str
    duration_ms: U64
    steps_completed: U32


class WorkflowRunFailed(_Event):
    """A workflow run failed.

    >>> WorkflowRunFailed(run_id=run, workflow_name="nightly", error="step s2 failed")
    """

    type: Literal["workflow_run_failed"] = "workflow_run_failed"
    run_id: UUID
    workflow_name: str
    error: str


class WorkflowRunPaused(_Event):
    """A workflow run paused at a step.

    >>> WorkflowRunPaused(run_id=run, step_id="s2", reason="awaiting approval")
    """

    type: Literal["workflow_run_paused"] = "workflow_run_paused"
    run_id: UUID
    step_id: str
    reason: str


class BudgetDecision(_Event):
    """relay extension: the outcome of a budget pause, seen by every viewer.

    >>> BudgetDecision(request_id=rid, decision="continue", decided_by="client")
    """

    type: Literal["budget_decision"] = "budget_decision"
    request_id: UUID
    decision: Literal["continue", "stop"]
    decided_by: Literal["client", "timeout"]


AgentEvent: TypeAlias = Annotated[
    AgentSpawned
    | AgentTextDelta
    | AgentCompleted
    | AgentFailed
    | AgentCancelled
    | BudgetUpdate
    | BudgetWarning
    | BudgetExhausted
    | DepthLimitReached
    | CycleDetected
    | SynthesisStarted
    | MemoryCreated
    | ProviderFailover
    | WorkflowRunStarted
    | WorkflowStepStarted
    | WorkflowStepCompleted
    | WorkflowStepFailed
    | WorkflowRunCompleted
    | WorkflowRunFailed
    | WorkflowRunPaused
    | BudgetDecision,
    Field(discriminator="type"),
]

AGENT_EVENT_ADAPTER: TypeAdapter[AgentEvent] = TypeAdapter(AgentEvent)

EVENT_TYPES: frozenset[str] = frozenset(
    m.model_fields["type"].default for m in _Event.__subclasses__()
)
AGENT_SCOPED: frozenset[str] = frozenset(
    m.model_fields["type"].default for m in _Event.__subclasses__() if "agent_id" in m.model_fields
)
WORKFLOW_TYPES: frozenset[str] = frozenset(t for t in EVENT_TYPES if t.startswith("workflow_"))


def parse_event(data: AgentEvent | dict[str, Any] | str | bytes) -> AgentEvent:
    """Validate ``data`` into an AgentEvent model.

    Accepts a model instance (returned as is), a dict with a ``type`` key, or
    JSON text. Raises ``pydantic.ValidationError`` naming the bad field.

    >>> parse_event({"type": "synthesis_started", "request_id": rid}).type
    'synthesis_started'
    """
    if isinstance(data, _Event):
        return data
    if isinstance(data, str | bytes):
        return AGENT_EVENT_ADAPTER.validate_json(data)
    return AGENT_EVENT_ADAPTER.validate_python(data)


def event_request_id(event: AgentEvent) -> UUID | None:
    """The ``request_id`` an event carries in its own fields, if it has one."""
    if "request_id" not in type(event).model_fields:
        # Not getattr with a default: a missing attribute goes through
        # pydantic's slow __getattr__, on every event of the publish path.
        return None
    value = event.request_id  # type: ignore[union-attr]
    return value if isinstance(value, UUID) else None


class EventFrame(BaseModel):
    """Schema of what a client receives for a published event (documentation only).

    The frame is the AgentEvent object with three more top-level fields. It is
    assembled by the publish script; this model exists for ``relay schema``
    and for clients that want to validate frames.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    request_id: UUID
    seq: Annotated[int, Field(ge=1)]
    ts: Annotated[int, Field(description="publish time, ms since the epoch (Redis clock)")]
