"""relay events as AG-UI events: the pure mapping (relay.wire.agui_map), every event type.

Every event the mapper returns is validated with the official AG-UI models
(the ``ag-ui-protocol`` package), and the rules the official client's
``verifyEvents`` enforces that matter here are checked
(:func:`tests.agui_checks.verify`). The Node test
(tests/integration/test_agui_client.py) runs the client itself.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest

from relay.wire.agui_input import Cursor, parse_input, resume_cursor
from relay.wire.agui_map import AguiRun, message_id, spawn_call_id
from relay.wire.agui_state import adopt_state, initial_state
from relay.wire.events import EVENT_TYPES
from tests.agui_checks import apply, client_messages, verify

RID = str(uuid.uuid4())
ROOT, CHILD, GRANDCHILD = (str(uuid.uuid4()) for _ in range(3))
RUN_ID = str(uuid.uuid4())
EPOCH = "e1"


def frames(*events: dict[str, Any], start: int = 1) -> list[dict[str, Any]]:
    return [
        {**e, "request_id": RID, "seq": i, "ts": 1_000_000 + i}
        for i, e in enumerate(events, start=start)
    ]


def spawned(aid: str, parent: str | None, depth: int = 0) -> dict[str, Any]:
    return {
        "type": "agent_spawned",
        "agent_id": aid,
        "parent_id": parent,
        "task_description": f"task of {aid[:4]}",
        "depth": depth,
        "index": 0,
        "total": 1,
    }


def text(aid: str, chunk: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": aid, "text": chunk}


def completed(aid: str) -> dict[str, Any]:
    return {
        "type": "agent_completed",
        "agent_id": aid,
        "result_summary": f"done {aid[:4]}",
        "tokens_used": 5,
        "duration_ms": 7,
    }


def budget(kind: str, used: int, **more: Any) -> dict[str, Any]:
    return {"type": kind, "request_id": RID, "tokens_used": used, "budget_total": 100, **more}


PENDING = {
    "pause_id": "p1",
    "tokens_used": 80,
    "budget_total": 100,
    "opened_ts": 1_000,
    "deadline_ts": 31_000,
    "timeout_decision": "stop",
}

# One event of every relay type (and the tree they need), in an order a run could have.
EVERY_TYPE = frames(
    spawned(ROOT, None),
    text(ROOT, "Plan: "),
    spawned(CHILD, ROOT, 1),
    spawned(GRANDCHILD, CHILD, 2),
    text(CHILD, "child says"),
    text(GRANDCHILD, "grandchild says"),
    {"type": "memory_created", "agent_id": CHILD, "fact": "a fact"},
    {"type": "depth_limit_reached", "agent_id": GRANDCHILD, "attempted_depth": 3, "max_depth": 2},
    {"type": "cycle_detected", "agent_id": GRANDCHILD, "cycle_description": "a -> a"},
    {"type": "provider_failover", "from_provider": "a", "to_provider": "b", "reason": "429"},
    {"type": "agent_failed", "agent_id": GRANDCHILD, "error": "flaky", "will_retry": True},
    {"type": "agent_failed", "agent_id": GRANDCHILD, "error": "broken", "will_retry": False},
    budget("budget_update", 50, percentage=50.0),
    budget("budget_warning", 80),
    {"type": "budget_decision", "request_id": RID, "decision": "continue", "decided_by": "client"},
    {"type": "agent_cancelled", "agent_id": CHILD, "reason": "cancelled by user"},
    budget("budget_exhausted", 100, completed_agents=[], incomplete_agents=[CHILD]),
    {"type": "workflow_run_started", "run_id": RUN_ID, "workflow_name": "w", "trigger_type": "t"},
    {
        "type": "workflow_step_started",
        "run_id": RUN_ID,
        "step_id": "s1",
        "step_name": "one",
        "step_type": "x",
    },
    {
        "type": "workflow_step_failed",
        "run_id": RUN_ID,
        "step_id": "s1",
        "step_name": "one",
        "error": "e",
        "will_retry": True,
    },
    {
        "type": "workflow_step_completed",
        "run_id": RUN_ID,
        "step_id": "s1",
        "step_name": "one",
        "duration_ms": 3,
    },
    {"type": "workflow_run_paused", "run_id": RUN_ID, "step_id": "s1", "reason": "wait"},
    {
        "type": "workflow_run_completed",
        "run_id": RUN_ID,
        "workflow_name": "w",
        "duration_ms": 9,
        "steps_completed": 1,
    },
    {"type": "workflow_run_failed", "run_id": RUN_ID, "workflow_name": "w", "error": "late"},
    {"type": "synthesis_started", "request_id": RID},
    text(ROOT, "answer."),
    completed(ROOT),
)


def stream(
    items: list[dict[str, Any]], pending: dict[str, Any] | None = None
) -> tuple[AguiRun, list[dict[str, Any]]]:
    run = AguiRun("t", "r", initial_state(RID, EPOCH))
    out = run.start()
    for frame in items:
        out += run.feed(frame, EPOCH, pending if frame["type"] == "budget_warning" else None)
    return run, out


def test_every_relay_event_type_is_mapped_and_the_stream_verifies() -> None:
    assert {f["type"] for f in EVERY_TYPE} == EVENT_TYPES
    run, out = stream(EVERY_TYPE)
    verify(out)
    kinds = [e["type"] for e in out]
    assert kinds[:2] == ["RUN_STARTED", "STATE_SNAPSHOT"]
    assert out[-1] == {
        "type": "RUN_FINISHED",
        "threadId": "t",
        "runId": "r",
        "result": f"done {ROOT[:4]}",
        "outcome": {"type": "success"},
    }
    # Every relay event leaves its seq in the client's state or a message.
    recorded = [
        op["value"]
        for e in out
        if e["type"] == "STATE_DELTA"
        for op in e["delta"]
        if op["path"] == "/relay/seq"
    ]
    recorded += [e["metadata"]["relay"]["seq"] for e in out if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert sorted(recorded) == list(range(1, len(EVERY_TYPE) + 1))
    # The client's state after applying the stream is the mapper's.
    assert apply(None, out) == run.state
    state = run.state
    assert state["agents"][CHILD]["status"] == "cancelled"
    assert state["agents"][GRANDCHILD]["status"] == "failed"
    assert state["agents"][GRANDCHILD]["depth_limit"] == {"attempted_depth": 3, "max_depth": 2}
    assert state["agents"][GRANDCHILD]["cycle"] == "a -> a"
    assert state["agents"][CHILD]["memories"] == 1
    assert state["provider"] == {"from_provider": "a", "to_provider": "b", "reason": "429"}
    assert state["budget"]["exhausted"] and state["budget"]["warned"]
    assert state["last_decision"] == {"decision": "continue", "decided_by": "client"}
    assert state["workflows"][RUN_ID]["status"] == "failed"
    assert state["workflows"][RUN_ID]["steps"]["s1"]["status"] == "completed"
    assert state["outcome"] == {"status": "completed", "agent_id": ROOT, "seq": len(EVERY_TYPE)}
    assert state["relay"] == {"epoch": EPOCH, "seq": len(EVERY_TYPE)}


def test_sub_agents_are_subagents_spawned_by_a_tool_call_of_their_parent() -> None:
    _, out = stream(EVERY_TYPE)
    starts = {e["subagentRunId"]: e for e in out if e["type"] == "SUBAGENT_STARTED"}
    assert set(starts) == {CHILD, GRANDCHILD}
    assert "parentSubagentRunId" not in starts[CHILD]  # a child of the run's own agent
    assert starts[GRANDCHILD]["parentSubagentRunId"] == CHILD
    assert starts[GRANDCHILD]["parentToolCallId"] == spawn_call_id(GRANDCHILD)
    call = next(
        e
        for e in out
        if e["type"] == "TOOL_CALL_START" and e["toolCallId"] == spawn_call_id(GRANDCHILD)
    )
    assert call["toolCallName"] == "spawn_agent"
    assert call["parentMessageId"] == message_id(CHILD)
    assert call["subagentRunId"] == CHILD  # the call belongs to the parent's work
    results = {e["toolCallId"]: e for e in out if e["type"] == "TOOL_CALL_RESULT"}
    assert results[spawn_call_id(CHILD)]["content"] == "cancelled: cancelled by user"
    assert results[spawn_call_id(GRANDCHILD)]["content"] == "failed: broken"
    errors = {e["subagentRunId"]: e["code"] for e in out if e["type"] == "SUBAGENT_ERROR"}
    assert errors == {GRANDCHILD: "relay.failed", CHILD: "relay.cancelled"}


def test_text_is_one_message_per_agent_with_an_id_derived_from_it() -> None:
    _, out = stream(EVERY_TYPE)
    contents: dict[str, str] = {}
    for e in out:
        if e["type"] == "TEXT_MESSAGE_CONTENT":
            contents[e["messageId"]] = contents.get(e["messageId"], "") + e["delta"]
    assert contents == {
        message_id(ROOT): "Plan: answer.",
        message_id(CHILD): "child says",
        message_id(GRANDCHILD): "grandchild says",
    }
    child = [e for e in out if e.get("messageId") == message_id(CHILD)]
    assert all(e["subagentRunId"] == CHILD for e in child)
    assert all("subagentRunId" not in e for e in out if e.get("messageId") == message_id(ROOT))


def test_a_budget_pause_ends_the_run_with_the_interrupt_outcome() -> None:
    items = frames(
        spawned(ROOT, None),
        spawned(CHILD, ROOT, 1),
        text(CHILD, "x"),
        budget("budget_warning", 80),
        text(CHILD, "after"),
    )
    run, out = stream(items, PENDING)
    verify(out)
    assert run.finished
    kinds = [e["type"] for e in out]
    assert kinds[-4:] == ["TEXT_MESSAGE_END", "SUBAGENT_FINISHED", "STATE_SNAPSHOT", "RUN_FINISHED"]
    assert out[-3]["outcome"] == {"type": "suspended", "interruptIds": ["p1"]}
    (interrupt,) = out[-1]["outcome"]["interrupts"]
    assert out[-1]["outcome"]["type"] == "interrupt"
    assert interrupt["id"] == "p1"
    assert interrupt["reason"] == "relay:budget_pause"
    assert interrupt["expiresAt"] == "1970-01-01T00:00:31.000Z"
    assert interrupt["responseSchema"]["required"] == ["decision"]
    assert run.state["pending_decision"]["pause_id"] == "p1"
    assert run.seq == 4  # the text after the warning belongs to the next run


def test_a_warning_whose_pause_is_already_answered_is_only_state() -> None:
    run, out = stream(frames(spawned(ROOT, None), budget("budget_warning", 80)), None)
    assert not run.finished
    assert out[-1]["type"] == "STATE_DELTA"


@pytest.mark.parametrize(
    ("terminal", "last"),
    [
        (
            {"type": "agent_cancelled", "agent_id": ROOT, "reason": "r"},
            {
                "type": "RUN_FINISHED",
                "threadId": "t",
                "runId": "r",
                "outcome": {"type": "cancelled"},
            },
        ),
        (
            {"type": "agent_failed", "agent_id": ROOT, "error": "boom", "will_retry": False},
            {"type": "RUN_ERROR", "message": "boom", "code": "relay.agent_failed"},
        ),
    ],
)
def test_the_root_agent_ends_the_run(terminal: dict[str, Any], last: dict[str, Any]) -> None:
    run, out = stream(
        frames(spawned(ROOT, None), spawned(CHILD, ROOT, 1), text(CHILD, "x"), terminal)
    )
    verify(out)
    assert out[-1] == last
    # A sub-agent still open is closed before the end.
    assert {
        "type": "SUBAGENT_ERROR",
        "subagentRunId": CHILD,
        "message": "the request ended before this agent did",
        "code": "relay.request_ended",
    } in out
    assert run.feed(frames(text(ROOT, "late"), start=9)[0], EPOCH) == []


def test_a_resumed_run_continues_the_clients_state_and_messages() -> None:
    items = EVERY_TYPE
    for cut in range(1, len(items)):
        _, out1 = stream(items[:cut])
        client_state = apply(None, out1)
        messages = client_messages(out1)
        body = parse_input(
            {"threadId": "t", "runId": "r2", "state": client_state, "messages": messages}
        )
        adopted = adopt_state(body.state, RID)
        assert adopted is not None
        cursor = resume_cursor(body, adopted)
        assert cursor == Cursor(cut, EPOCH)
        second = AguiRun("t", "r2", adopted)
        out2 = second.start()
        for frame in items[cursor.seq :]:
            out2 += second.feed(frame, EPOCH)
        verify(out2)
        # Nothing repeated, nothing skipped: the text the two runs carry is the whole text.
        whole = client_messages(out1 + out2)
        once = client_messages(stream(items)[1])
        assert {m["id"]: m.get("content") for m in whole} == {
            m["id"]: m.get("content") for m in once
        }
        assert apply(client_state, out2) == stream(items)[0].state


def test_a_resumed_run_announces_the_subagents_still_running() -> None:
    items = frames(spawned(ROOT, None), spawned(CHILD, ROOT, 1), spawned(GRANDCHILD, CHILD, 2))
    first, _ = stream(items)
    again = AguiRun("t", "r2", copy.deepcopy(first.state))
    out = again.start()
    verify(out)
    starts = [e["subagentRunId"] for e in out if e["type"] == "SUBAGENT_STARTED"]
    assert starts == [CHILD, GRANDCHILD]  # parents first


def test_a_state_with_an_outcome_finishes_at_once() -> None:
    first, _ = stream(EVERY_TYPE)
    again = AguiRun("t", "r2", copy.deepcopy(first.state))
    out = again.start()
    verify(out)
    assert [e["type"] for e in out] == ["RUN_STARTED", "STATE_SNAPSHOT", "RUN_FINISHED"]


def test_a_new_epoch_moves_the_clients_cursor_to_its_start() -> None:
    run, out = stream(frames(spawned(ROOT, None), text(ROOT, "a"), text(ROOT, "b")))
    out += run.new_epoch("e2")
    for frame in frames(text(ROOT, "c"), text(ROOT, "d")):
        out += run.feed(frame, "e2")
    verify(out)
    state = apply(None, out)
    assert state["relay"] == {"epoch": "e2", "seq": 0}  # only text since: recorded in messages
    body = parse_input(
        {"threadId": "t", "runId": "r2", "state": state, "messages": client_messages(out)}
    )
    assert resume_cursor(body, adopt_state(body.state, RID)) == Cursor(2, "e2")
    assert contents_of(out) == {message_id(ROOT): "abcd"}  # the same message goes on


def contents_of(events: list[dict[str, Any]]) -> dict[str, str]:
    return {m["id"]: m["content"] for m in client_messages(events) if m["role"] == "assistant"}


def test_a_snapshots_text_so_far_opens_each_agents_message() -> None:
    first, _ = stream(frames(spawned(ROOT, None), spawned(CHILD, ROOT, 1), text(CHILD, "x")))
    state = copy.deepcopy(first.state)
    run = AguiRun("t", "r2", state)
    texts = {
        CHILD: {"text": "so far", "truncated": False, "bytes": 6},
        ROOT: {"text": "...tail", "truncated": True, "bytes": 900},
    }
    out = run.start(run.texts_so_far(texts, 3, EPOCH))
    for frame in frames(text(CHILD, " and more"), completed(CHILD), completed(ROOT), start=4):
        out += run.feed(frame, EPOCH)
    verify(out)
    assert contents_of(out) == {message_id(CHILD): "so far and more", message_id(ROOT): "...tail"}
    assert {
        "type": "CUSTOM",
        "name": "relay.text_truncated",
        "value": {"agent_id": ROOT, "bytes": 900},
    } in out
    body = parse_input(
        {
            "threadId": "t",
            "runId": "r3",
            "state": apply(None, out[:6]),
            "messages": client_messages(out[:6]),
        }
    )
    assert resume_cursor(body, adopt_state(body.state, RID)) == Cursor(3, EPOCH)


def test_the_text_so_far_of_a_finished_request_comes_before_its_end() -> None:
    done, _ = stream(EVERY_TYPE)
    run = AguiRun("t", "r2", copy.deepcopy(done.state))
    texts = {ROOT: {"text": "Plan: answer.", "truncated": False, "bytes": 13}}
    out = run.start(run.texts_so_far(texts, len(EVERY_TYPE), EPOCH))
    verify(out)
    assert [e["type"] for e in out] == [
        "RUN_STARTED",
        "STATE_SNAPSHOT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
