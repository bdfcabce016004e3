"""What an AG-UI client sends: ``RunAgentInput``, where it resumes, and its budget answer.

The AG-UI HTTP transport is one ``POST`` per run whose body is a
``RunAgentInput`` (``threadId``, ``runId``, ``state``, ``messages``,
``forwardedProps``, ``resume``, …). relay reads four things from it:

* where the client stands in the request's stream (:func:`resume_cursor`):
  ``forwardedProps.relay = {"after_seq": N, "epoch": E}`` when given (clients
  that keep no AG-UI state), else the highest seq recorded in what the
  client sends back anyway, its ``state.relay`` and the ``metadata.relay``
  of its messages; nothing of either: a first attach;
* its answer to a budget pause (:func:`budget_answer`): a ``resume`` entry
  for the pause's interrupt id, ``status: "resolved"`` with
  ``payload: {"decision": "continue" | "stop"}``; ``"cancelled"`` leaves the
  pause to its deadline.

Messages, tools and context are accepted and ignored: relay's agents take no
input through the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class InputError(ValueError):
    """A body that is not a usable ``RunAgentInput`` (HTTP 400, the message names the field)."""


class ResumeEntry(BaseModel):
    """One answer to an interrupt (AG-UI ``ResumeEntry``)."""

    model_config = ConfigDict(extra="allow")
    interruptId: str = Field(min_length=1)
    status: Literal["resolved", "cancelled"]
    payload: Any = None


class RunInput(BaseModel):
    """The parts of AG-UI's ``RunAgentInput`` relay reads (others are allowed and ignored)."""

    model_config = ConfigDict(extra="allow")
    threadId: str = Field(min_length=1, max_length=256)
    runId: str = Field(min_length=1, max_length=256)
    state: Any = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    forwardedProps: Any = None
    resume: list[ResumeEntry] | None = None


def parse_input(body: dict[str, Any]) -> RunInput:
    """Validate a decoded body; :class:`InputError` names the first bad field.

    >>> parse_input({"threadId": "t", "runId": "r", "messages": []}).runId
    'r'
    """
    try:
        return RunInput.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise InputError(f"RunAgentInput field '{where}': {err['msg']}") from None


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in a request's stream: every event with seq <= ``seq`` was applied."""

    seq: int
    epoch: str | None


def _relay_mark(value: Any) -> tuple[int, str | None] | None:
    if not isinstance(value, dict):
        return None
    mark = value.get("relay")
    if not isinstance(mark, dict):
        return None
    seq, epoch = mark.get("seq"), mark.get("epoch")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None
    return seq, epoch if isinstance(epoch, str) else None


def resume_cursor(run: RunInput, state: dict[str, Any] | None) -> Cursor | None:
    """Where the client's run continues the stream (None: from the start).

    ``state`` is the client's state once accepted as relay's
    (:func:`relay.wire.agui_state.adopt_state`). Explicit
    ``forwardedProps.relay.after_seq`` wins; else the highest seq the state
    and the messages of the state's epoch record.
    """
    props = run.forwardedProps
    if isinstance(props, dict) and isinstance(props.get("relay"), dict):
        explicit = props["relay"]
        after = explicit.get("after_seq")
        if after is not None:
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                raise InputError("forwardedProps.relay.after_seq must be an integer >= 0")
            epoch = explicit.get("epoch")
            if epoch is not None and not isinstance(epoch, str):
                raise InputError("forwardedProps.relay.epoch must be a string")
            return Cursor(after, epoch)
    if state is None:
        return None
    mark = _relay_mark(state)
    if mark is None:
        return None
    seq, epoch = mark
    for message in run.messages:
        found = _relay_mark(message.get("metadata"))
        if found is not None and found[1] == epoch:
            seq = max(seq, found[0])
    return Cursor(seq, epoch)


@dataclass(frozen=True, slots=True)
class Answer:
    """A resume entry for a budget pause: the decision, or None when abandoned."""

    pause_id: str
    decision: Literal["continue", "stop"] | None


def budget_answers(run: RunInput) -> list[Answer]:
    """The client's answers to budget pauses, in order (:class:`InputError` if malformed)."""
    answers = []
    for i, entry in enumerate(run.resume or []):
        if entry.status == "cancelled":
            answers.append(Answer(entry.interruptId, None))
            continue
        payload = entry.payload
        decision = payload.get("decision") if isinstance(payload, dict) else None
        if decision not in ("continue", "stop"):
            raise InputError(f'resume.{i}.payload must be {{"decision": "continue" | "stop"}}')
        answers.append(Answer(entry.interruptId, decision))
    return answers
