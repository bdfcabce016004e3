"""What an AG-UI client sends (RunAgentInput, resume position, budget answers), the
state shapes, and the process's shared frame decoding."""

from __future__ import annotations

import uuid

import pytest

from relay.gateway.agui import FrameCache
from relay.wire.agui_input import Cursor, InputError, budget_answers, parse_input, resume_cursor
from relay.wire.agui_state import adopt_state, from_relay_snapshot, initial_state, pointer
from tests.unit.test_agui_map import EPOCH, PENDING, RID, ROOT


def test_the_explicit_cursor_wins_and_bad_ones_are_refused() -> None:
    body = parse_input(
        {
            "threadId": "t",
            "runId": "r",
            "messages": [],
            "forwardedProps": {"relay": {"after_seq": 7, "epoch": "e9"}},
        }
    )
    assert resume_cursor(body, None) == Cursor(7, "e9")
    assert resume_cursor(parse_input({"threadId": "t", "runId": "r", "messages": []}), None) is None
    with pytest.raises(InputError, match="after_seq"):
        resume_cursor(
            parse_input(
                {
                    "threadId": "t",
                    "runId": "r",
                    "messages": [],
                    "forwardedProps": {"relay": {"after_seq": -1}},
                }
            ),
            None,
        )
    with pytest.raises(InputError, match="runId"):
        parse_input({"threadId": "t", "messages": []})


def test_messages_of_another_epoch_do_not_move_the_cursor() -> None:
    state = initial_state(RID, EPOCH, 3)
    msgs = [
        {
            "id": "m",
            "role": "assistant",
            "content": "x",
            "metadata": {"relay": {"epoch": "old", "seq": 99}},
        }
    ]
    body = parse_input({"threadId": "t", "runId": "r", "state": state, "messages": msgs})
    assert resume_cursor(body, adopt_state(body.state, RID)) == Cursor(3, EPOCH)


def test_a_state_of_another_request_is_not_adopted() -> None:
    assert adopt_state(initial_state(str(uuid.uuid4())), RID) is None
    assert adopt_state({"anything": 1}, RID) is None
    assert adopt_state(None, RID) is None


def test_budget_answers_come_from_the_resume_input() -> None:
    body = parse_input(
        {
            "threadId": "t",
            "runId": "r",
            "messages": [],
            "resume": [
                {"interruptId": "p1", "status": "resolved", "payload": {"decision": "stop"}},
                {"interruptId": "p2", "status": "cancelled"},
            ],
        }
    )
    answers = budget_answers(body)
    assert [(a.pause_id, a.decision) for a in answers] == [("p1", "stop"), ("p2", None)]
    bad = parse_input(
        {
            "threadId": "t",
            "runId": "r",
            "messages": [],
            "resume": [{"interruptId": "p1", "status": "resolved", "payload": {"approved": True}}],
        }
    )
    with pytest.raises(InputError, match="decision"):
        budget_answers(bad)


def test_the_state_of_a_relay_snapshot() -> None:
    snap = {
        "type": "snapshot",
        "request_id": RID,
        "epoch": EPOCH,
        "seq": 12,
        "agents": [
            {
                "agent_id": ROOT,
                "parent_id": None,
                "status": "running",
                "tokens_used": 1,
                "task_description": "t",
                "depth": 0,
                "spawned_seq": 1,
                "updated_seq": 2,
            }
        ],
        "budget": {
            "tokens_used": 1,
            "budget_total": 2,
            "percentage": 50.0,
            "seq": 3,
            "warned": False,
            "exhausted": False,
            "completed_agents": None,
            "incomplete_agents": None,
        },
        "pending_decision": PENDING,
        "last_decision": None,
        "synthesis_started": False,
        "outcome": None,
    }
    state = from_relay_snapshot(snap)
    assert state["relay"] == {"epoch": EPOCH, "seq": 12}
    assert "spawned_seq" not in state["agents"][ROOT]
    assert state["pending_decision"]["expires_at"] == "1970-01-01T00:00:31.000Z"
    assert "seq" not in state["budget"]


def test_pointers_escape_tilde_and_slash() -> None:
    assert pointer("a~b", "c/d") == "/a~0b/c~1d"


def test_streams_of_one_process_decode_each_frame_once() -> None:
    cache = FrameCache(size=2, chars=100)
    texts = ['{"type":"a","seq":1}', '{"type":"b","seq":2}', '{"type":"c","seq":3}']
    first = cache.decode(texts[0])
    assert cache.decode(texts[0]) is first  # the same object for every stream
    assert cache.decode(texts[0][:-1] + "}") is not first  # equal text, another object
    cache.decode(texts[1])
    cache.decode(texts[2])
    assert len(cache._items) == 2 and cache.held <= 100
    assert cache.decode(texts[0]) is not first  # evicted, decoded again
    big = FrameCache(size=10, chars=30)
    for t in texts:
        big.decode(t)
    assert big.held <= 30
