"""Wire models: AgentEvent variants, client commands, error codes."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from relay.wire.commands import CancelAgent, CommandError, Subscribe, parse_command
from relay.wire.events import AGENT_SCOPED, EVENT_TYPES, AgentCompleted, parse_event
from relay.wire.schema import frame_schemas

AID = "0195f3a4-1b2c-7d8e-9f00-112233445566"


def test_agent_spawned_round_trips_byte_for_byte() -> None:
    wire = (
        '{"type":"agent_spawned","agent_id":"%s","parent_id":null,'
        '"task_description":"Research X","depth":1,"index":0,"total":3}' % AID
    )
    assert parse_event(wire).model_dump_json() == wire


def test_every_contract_variant_is_modelled() -> None:
    contract = {
        "agent_spawned", "agent_text_delta", "agent_completed", "agent_failed",
        "agent_cancelled", "budget_update", "budget_warning", "budget_exhausted",
        "depth_limit_reached", "cycle_detected", "synthesis_started", "memory_created",
        "provider_failover", "workflow_run_started", "workflow_step_started",
        "workflow_step_completed", "workflow_step_failed", "workflow_run_completed",
        "workflow_run_failed", "workflow_run_paused",
    }  # fmt: skip
    assert contract <= EVENT_TYPES
    assert len(AGENT_SCOPED) == 8


def test_optional_value_serialises_as_null() -> None:
    event = parse_event(
        {"type": "agent_spawned", "agent_id": AID, "parent_id": None,
         "task_description": "t", "depth": 0, "index": 0, "total": 1}
    )  # fmt: skip
    assert json.loads(event.model_dump_json())["parent_id"] is None


def test_uuid_is_lowercase_hyphenated() -> None:
    event = parse_event({"type": "agent_text_delta", "agent_id": AID.upper(), "text": "x"})
    assert json.loads(event.model_dump_json())["agent_id"] == AID


def test_result_summary_is_cut_at_200_bytes_on_a_character_boundary() -> None:
    event = AgentCompleted(agent_id=uuid.UUID(AID), result_summary="é" * 150, tokens_used=1,
                           duration_ms=2)  # fmt: skip
    assert event.result_summary.endswith("...")
    assert len(event.result_summary[:-3].encode()) <= 200


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"type": "agent_text_delta", "agent_id": "nope", "text": "x"}, "agent_id"),
        ({"type": "agent_text_delta", "agent_id": AID}, "text"),
        ({"type": "agent_spawned", "agent_id": AID, "parent_id": None, "task_description": "t",
          "depth": 256, "index": 0, "total": 1}, "depth"),
        ({"type": "agent_text_delta", "agent_id": AID, "text": "x", "txet": 1}, "txet"),
        ({"type": "no_such_event"}, "no_such_event"),
    ],
)  # fmt: skip
def test_invalid_event_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_event(data)
    assert field in str(err.value)


def test_commands_of_the_original_parse() -> None:
    assert isinstance(parse_command('{"type":"cancel_agent","agent_id":"%s"}' % AID), CancelAgent)
    assert parse_command('{"type":"ping"}').type == "ping"


def test_unknown_fields_in_commands_are_ignored() -> None:
    cmd = parse_command('{"type":"ping","whatever":[1,2]}')
    assert cmd.type == "ping"


def test_subscribe_with_resume() -> None:
    cmd = parse_command(json.dumps({"type": "subscribe", "request_id": AID, "after_seq": 5}))
    assert isinstance(cmd, Subscribe)
    assert cmd.after_seq == 5


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_json"),
        ("{}", "missing_field"),
        ('{"type":"dance"}', "unknown_type"),
        ('{"type":"cancel_agent"}', "missing_field"),
        ('{"type":"cancel_agent","agent_id":"x"}', "invalid_uuid"),
        ('{"type":"subscribe","request_id":"%s","after_seq":-1}' % AID, "invalid_field"),
        ('{"type":"subscribe_workflow","run_id":12}', "invalid_uuid"),
    ],
)
def test_bad_commands_map_to_error_codes(text: str, code: str) -> None:
    with pytest.raises(CommandError) as err:
        parse_command(text)
    assert err.value.code == code
    assert err.value.frame()["type"] == "error"


def test_command_id_is_kept_on_errors() -> None:
    with pytest.raises(CommandError) as err:
        parse_command('{"type":"cancel_agent","agent_id":"x","command_id":"c1"}')
    assert err.value.frame()["command_id"] == "c1"


def test_schema_covers_events_commands_and_replies() -> None:
    schemas = frame_schemas()
    text = json.dumps(schemas)
    for name in ("agent_spawned", "budget_decision", "subscribe", "resync_required", "lagged"):
        assert name in text
    assert set(schemas) == {"event", "event_frame_envelope", "command", "server_frames"}
