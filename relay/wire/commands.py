"""Client commands and the gateway's replies.

Commands are what browser and terminal clients send over the WebSocket. The
original's six commands are accepted unchanged; relay adds ``subscribe`` and
``unsubscribe``. Unknown fields are ignored (as the contract requires) and a
client ``command_id`` is echoed in the reply.

Every failure to parse a command maps to one :class:`CommandError` with a
stable ``code`` and a message that names the bad field, so the connection can
answer with an error frame and carry on.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

CommandId = str | int


class _Command(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    command_id: CommandId | None = None


class CancelAgent(_Command):
    """Cancel an agent and its descendants; a request id cancels the request."""

    type: Literal["cancel_agent"]
    agent_id: UUID
    reason: Annotated[str, Field(max_length=500)] = "cancelled by user"


class BudgetContinue(_Command):
    """Answer the pending budget pause: go on.

    ``pause_id`` (relay extension, from ``budget_pending`` or the snapshot)
    makes the answer apply to that pause only.
    """

    type: Literal["budget_continue"]
    request_id: UUID
    pause_id: Annotated[str, Field(max_length=64)] | None = None


class BudgetStop(_Command):
    """Answer the pending budget pause: stop (``pause_id`` as for continue)."""

    type: Literal["budget_stop"]
    request_id: UUID
    pause_id: Annotated[str, Field(max_length=64)] | None = None


class Ping(_Command):
    type: Literal["ping"]


class SubscribeWorkflow(_Command):
    type: Literal["subscribe_workflow"]
    run_id: UUID


class UnsubscribeWorkflow(_Command):
    type: Literal["unsubscribe_workflow"]
    run_id: UUID


class Subscribe(_Command):
    """Narrow the connection to this request (relay extension).

    ``after_seq`` resumes after the last seq the client saw; ``epoch`` is the
    epoch that seq belongs to (from ``subscribed`` or ``snapshot``);
    ``snapshot`` asks for the request's current state first.
    """

    type: Literal["subscribe"]
    request_id: UUID
    after_seq: Annotated[int, Field(ge=0)] | None = None
    epoch: str | None = None
    snapshot: bool = False


class Unsubscribe(_Command):
    type: Literal["unsubscribe"]
    request_id: UUID


class Refresh(_Command):
    """Replace the connection's token before it expires (same ``sub`` and ``tenant``)."""

    type: Literal["refresh"]
    token: Annotated[str, Field(min_length=1, max_length=8192)]


Command: TypeAlias = Annotated[
    CancelAgent
    | BudgetContinue
    | BudgetStop
    | Ping
    | SubscribeWorkflow
    | UnsubscribeWorkflow
    | Subscribe
    | Unsubscribe
    | Refresh,
    Field(discriminator="type"),
]

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_TYPES: frozenset[str] = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in _Command.__subclasses__()
)


class CommandError(Exception):
    """A command the gateway cannot accept; becomes an ``error`` frame."""

    def __init__(self, code: str, message: str, command_id: CommandId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id

    def frame(self) -> dict[str, Any]:
        """The error frame sent to the client."""
        return error_frame(self.code, self.message, self.command_id)


def error_frame(code: str, message: str, command_id: CommandId | None = None) -> dict[str, Any]:
    """``{"type":"error","code":...,"message":...}`` plus ``command_id`` when given."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if command_id is not None:
        frame["command_id"] = command_id
    return frame


def _describe(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p in COMMAND_TYPES))
    kind = first["type"]
    if kind == "missing":
        return "missing_field", f"missing field '{loc}'"
    if kind.startswith("uuid"):
        return "invalid_uuid", f"field '{loc}' is not a valid UUID"
    return "invalid_field", f"field '{loc}': {first['msg']}"


MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in a client frame (commands need 2)."""
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _nesting(text: str) -> int:
    """How deep ``text`` nests arrays and objects (strings ignored); stops past the limit."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


def _encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_object(text: str | bytes) -> dict[str, Any]:
    """Decode one client frame or REST body into a JSON object, or raise ``invalid_json``.

    Refused before anything acts on it: invalid UTF-8 or JSON, nesting deeper
    than :data:`MAX_JSON_DEPTH` (Python's parser would hit its recursion
    limit), and unpaired surrogate escapes such as ``"\\ud800"`` (they decode
    to a string that cannot be encoded again, so echoing one would fail).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("invalid_json", "frame is not valid UTF-8") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nesting(text) > MAX_JSON_DEPTH:
        raise CommandError("invalid_json", f"frame nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CommandError("invalid_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CommandError("invalid_json", "frame must be a JSON object")
    if "\\u" in text and not _encodable(raw):
        raise CommandError("invalid_json", "frame contains an unpaired surrogate escape")
    return raw


def parse_command(text: str | bytes) -> Command:
    """Parse one client frame into a command or raise :class:`CommandError`."""
    raw = load_object(text)
    command_id = raw.get("command_id")
    if not isinstance(command_id, str | int) or isinstance(command_id, bool):
        command_id = None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise CommandError("missing_field", "missing field 'type'", command_id)
    if kind not in COMMAND_TYPES:
        raise CommandError("unknown_type", f"unknown command type {kind!r}", command_id)
    try:
        return COMMAND_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        code, message = _describe(exc)
        raise CommandError(code, message, command_id) from None
