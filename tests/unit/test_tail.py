"""The terminal rendering (TreeRenderer) and the console's bookkeeping, without a terminal."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import pytest

from relay.aio import cancel_and_wait
from relay.tools.render import TreeRenderer, format_tokens
from relay.tools.tail import OUTBOX_MAX, Console
from tests.support import eventually

RID = "5b0e5a4e-6a43-4a57-9f39-1a2b3c4d5e6f"
OTHER = "9c1d2e3f-0000-4000-8000-000000000000"
ROOT, A, B, C, A1, A2 = (f"{i}{i}{i}{i}{i}{i}{i}{i}-0000-4000-8000-000000000000" for i in range(6))
seq = 0


def frame(kind: str, rid: str = RID, **fields: Any) -> dict[str, Any]:
    global seq
    seq += 1
    return {"type": kind, **fields, "request_id": rid, "seq": seq, "ts": 1}


def spawned(agent: str, parent: str | None, index: int = 0, total: int = 1, task: str = "t",
            depth: int = 0) -> dict[str, Any]:  # fmt: skip
    return frame("agent_spawned", agent_id=agent, parent_id=parent, task_description=task,
                 depth=depth, index=index, total=total)  # fmt: skip


def feed_all(renderer: TreeRenderer, frames: list[dict[str, Any]]) -> list[str]:
    return [line for f in frames for line in renderer.feed(f)]


def test_spawn_batches_draw_a_box_tree() -> None:
    lines = feed_all(TreeRenderer(), [
        spawned(ROOT, None, task="Answer"),
        spawned(A, ROOT, 0, 3, "Research", 1),
        spawned(B, ROOT, 1, 3, "Compare", 1),
        spawned(C, ROOT, 2, 3, "Summarize", 1),
        spawned(A1, A, 0, 2, "Dig", 2),
        spawned(A2, A, 1, 2, "Verify", 2),
        spawned(B + "x", C, 0, 1, "Check", 2),
    ])  # fmt: skip
    assert lines == [
        "Answer [00000000]",
        "├── Research [11111111] (1/3)",
        "├── Compare [22222222] (2/3)",
        "└── Summarize [33333333] (3/3)",
        "│   ├── Dig [44444444] (1/2)",
        "│   └── Verify [55555555] (2/2)",
        "    └── Check [22222222]",
    ]


def test_status_lines_sit_below_their_agent() -> None:
    r = TreeRenderer()
    feed_all(r, [spawned(ROOT, None), spawned(A, ROOT, 0, 2), spawned(A1, A, 0, 1)])
    assert r.feed(frame("agent_failed", agent_id=A1, error="boom", will_retry=True)) == [
        "│       ✗ [44444444] failed: boom (will retry)"
    ]
    assert r.feed(frame("agent_cancelled", agent_id=A, reason="cancelled by user")) == [
        "│   ⊘ [11111111] cancelled: cancelled by user"
    ]
    assert r.feed(frame("depth_limit_reached", agent_id=A1, attempted_depth=4, max_depth=3)) == [
        "│       ! [44444444] depth limit reached: depth 4 > max 3"
    ]
    assert r.feed(frame("cycle_detected", agent_id=ROOT, cycle_description="a -> b -> a")) == [
        "↻ [00000000] cycle detected: a -> b -> a"
    ]
    (done,) = r.feed(frame("agent_completed", agent_id=ROOT, result_summary="x" * 100,
                           tokens_used=12_450, duration_ms=1_500))  # fmt: skip
    assert done.startswith("✓ [00000000] completed in 1.5s, 12,450 tokens: xxx")
    assert done.endswith("...") and len(done) < 120


def test_events_of_unknown_agents_still_render() -> None:
    (line,) = TreeRenderer().feed(frame("agent_cancelled", agent_id=A, reason="r"))
    assert line == "⊘ [11111111] cancelled: r"
    (line,) = TreeRenderer().feed(spawned(A1, A, 0, 2, "Orphan", 2))
    assert line == "Orphan [44444444]", "a child whose parent was never seen starts a tree"


def test_token_counter_formatting() -> None:
    assert format_tokens(12_450, 500_000) == "[tokens: 12,450 / 500,000]"
    assert format_tokens(0, 10_000) == "[tokens: 0 / 10,000]"
    live = TreeRenderer(live_counter=True)
    update = frame("budget_update", tokens_used=12_450, budget_total=500_000, percentage=2.49)
    assert live.feed(update) == []
    assert live.counter == "[tokens: 12,450 / 500,000]"


def test_without_a_live_counter_it_prints_every_tenth_of_the_budget() -> None:
    r = TreeRenderer()
    out = feed_all(r, [
        frame("budget_update", tokens_used=used, budget_total=100_000, percentage=used / 1_000)
        for used in (5_000, 9_000, 10_000, 15_000, 31_000, 32_000)
    ])  # fmt: skip
    assert out == ["[tokens: 10,000 / 100,000]", "[tokens: 31,000 / 100,000]"]


def test_request_level_lines() -> None:
    r = TreeRenderer(live_counter=True)
    assert r.feed(frame("synthesis_started")) == ["» synthesis started"]
    assert r.feed(frame("budget_warning", tokens_used=400_000, budget_total=500_000)) == [
        "⚠ budget warning [tokens: 400,000 / 500,000]"
    ]
    assert r.feed(frame("budget_decision", decision="continue", decided_by="timeout")) == [
        "budget decision: continue (by timeout)"
    ]
    exhausted = frame("budget_exhausted", tokens_used=500_001, budget_total=500_000,
                      completed_agents=[A, B], incomplete_agents=[C])  # fmt: skip
    assert r.feed(exhausted) == [
        "■ budget exhausted [tokens: 500,001 / 500,000]: 2 completed, 1 incomplete"
    ]
    assert r.feed({"type": "lagged", "request_id": RID, "skipped": 12}) == [
        "… lagged: 12 events of 5b0e5a4e skipped"
    ]
    assert r.feed({"type": "resync_required", "request_id": RID, "reason": "history_trimmed"}) == [
        "↺ resync required for 5b0e5a4e: history_trimmed"
    ]
    pending = {
        "type": "budget_pending",
        "request_id": RID,
        "tokens_used": 1,
        "budget_total": 10_000,
    }
    assert r.feed(pending) == ["⏸ budget decision pending [tokens: 1 / 10,000]"]
    assert r.feed({"type": "error", "code": "no_pending_decision", "message": "none"}) == [
        "error no_pending_decision: none"
    ]
    assert r.feed({"type": "pong"}) == []
    assert r.feed(frame("agent_text_delta", agent_id=A, text="hello")) == []


def test_lines_name_their_request_once_several_interleave() -> None:
    r = TreeRenderer()
    assert r.feed(frame("synthesis_started")) == ["» synthesis started"]
    assert r.feed(frame("synthesis_started", rid=OTHER)) == ["[9c1d2e3f] » synthesis started"]


def console(**kw: Any) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console("ws://unused", request_ids=[RID], out=out, **kw), out


def test_console_tracks_the_resume_point_per_request() -> None:
    c, _ = console()
    c.on_message(json.dumps({"type": "subscribed", "request_id": RID, "epoch": "e1", "seq": 7}))
    assert c.last_seq == {RID: 7} and c.epoch == {RID: "e1"}
    c.on_message(json.dumps(frame("synthesis_started") | {"seq": 8}))
    assert c.last_seq[RID] == 8
    c.on_message(json.dumps({"type": "resync_required", "request_id": RID, "epoch": "e2",
                             "reason": "epoch_changed"}))  # fmt: skip
    assert c.last_seq[RID] == 0 and c.epoch[RID] == "e2"
    c.on_message("not json")  # ignored, like the original clients
    resumed, _ = console(after_seq=3)
    resumed.on_message(json.dumps({"type": "subscribed", "request_id": RID, "seq": 9}))
    assert resumed.last_seq == {RID: 3}, "an explicit resume point is kept until events arrive"


def test_console_json_mode_prints_raw_frames() -> None:
    c, out = console(raw_json=True)
    text = json.dumps(frame("synthesis_started"))
    c.on_message(text)
    assert out.getvalue() == text + "\n"


def test_console_answers_a_budget_pause_from_a_typed_line() -> None:
    c, out = console(interactive=True)
    c.on_message(json.dumps(frame("budget_warning", tokens_used=8, budget_total=10)))
    assert c.prompts == [RID]
    c.answer("maybe\n")
    assert c.prompts == [RID], "an unclear answer asks again"
    c.answer("y\n")
    assert c.prompts == []
    assert list(c._outbox) == [
        {"type": "budget_continue", "request_id": RID, "command_id": "tail-1"}
    ]
    assert "⚠ budget warning" in out.getvalue()


def test_console_drops_a_prompt_decided_elsewhere() -> None:
    c, _ = console(interactive=True)
    c.on_message(json.dumps({"type": "budget_pending", "request_id": RID, "tokens_used": 8,
                             "budget_total": 10}))  # fmt: skip
    assert c.prompts == [RID]
    c.on_message(json.dumps(frame("budget_decision", decision="stop", decided_by="timeout")))
    assert c.prompts == []
    c.answer("n\n")
    assert not c._outbox, "nothing is pending any more, so nothing is sent"


def test_console_never_prompts_without_input() -> None:
    c, _ = console(interactive=False)
    c.on_message(json.dumps(frame("budget_warning", tokens_used=8, budget_total=10)))
    assert c.prompts == []


def test_a_long_running_tail_stays_bounded() -> None:
    from relay.tools.render import REMEMBER_MAX

    renderer = TreeRenderer()
    for _ in range(REMEMBER_MAX + 50):
        renderer.feed(
            {"type": "agent_spawned", "agent_id": str(uuid.uuid4()), "parent_id": None,
             "task_description": "t", "depth": 0, "index": 0, "total": 1,
             "request_id": str(uuid.uuid4()), "seq": 1, "ts": 1}
        )  # fmt: skip
    assert len(renderer._agents) == REMEMBER_MAX
    assert len(renderer._requests) == REMEMBER_MAX


# ---------------------------------------------------------------- prompts that end


class Tty(io.StringIO):
    """A StringIO that says it is a terminal, so the console keeps a live status line."""

    def isatty(self) -> bool:
        return True


def status_line(out: io.StringIO) -> str:
    """What the terminal shows on the status line: the text after the last line clear."""
    return out.getvalue().rsplit("\r\x1b[K", 1)[-1]


def paused_console(live: bool) -> tuple[Console, io.StringIO]:
    out: io.StringIO = Tty() if live else io.StringIO()
    c = Console("ws://unused", request_ids=[RID], interactive=True, out=out)
    c.on_message(json.dumps(spawned(ROOT, None, task="Answer")))
    c.on_message(json.dumps(spawned(A, ROOT, 0, 1, "Research", 1)))
    c.on_message(json.dumps(frame("budget_warning", tokens_used=8, budget_total=10)))
    assert c.prompts == [RID]
    return c, out


def test_the_prompt_leaves_the_status_line_when_the_request_ends() -> None:
    c, out = paused_console(live=True)
    assert "Continue? [y/n]" in status_line(out)
    c.on_message(json.dumps(frame("agent_completed", agent_id=A, result_summary="r",
                                  tokens_used=5, duration_ms=1)))  # fmt: skip
    assert c.prompts == [RID], "a sub-agent ending does not end the request"
    assert "Continue? [y/n]" in status_line(out)
    c.on_message(json.dumps(frame("agent_cancelled", agent_id=ROOT, reason="cancelled by user")))
    assert c.prompts == []
    assert "Continue? [y/n]" not in status_line(out)
    assert "[tokens: 8 / 10]" in status_line(out), "the counter stays"


def test_a_failed_root_ends_the_prompt_unless_it_retries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    c, _ = paused_console(live=False)
    c.on_message(json.dumps(frame("agent_failed", agent_id=ROOT, error="e", will_retry=True)))
    assert c.prompts == [RID]
    c.on_message(json.dumps(frame("agent_failed", agent_id=ROOT, error="e", will_retry=False)))
    assert c.prompts == []
    err = capsys.readouterr().err
    assert "Continue? [y/n] \nrelay tail: budget pause of 5b0e5a4e is over, no answer needed" in err


def test_a_snapshot_with_an_outcome_ends_the_prompt() -> None:
    c, out = paused_console(live=True)
    c.on_message(json.dumps({"type": "snapshot", "request_id": RID, "seq": 40, "agents": [],
                             "pending_decision": None,
                             "outcome": {"status": "completed", "agent_id": ROOT}}))  # fmt: skip
    assert c.prompts == []
    assert "Continue? [y/n]" not in status_line(out)


def test_a_decision_ends_the_prompt_on_the_status_line() -> None:
    c, out = paused_console(live=True)
    c.on_message(json.dumps(frame("budget_decision", decision="stop", decided_by="timeout")))
    assert c.prompts == [] and "Continue? [y/n]" not in status_line(out)


# ---------------------------------------------------------------- answers while disconnected


class FakeWs:
    """Records what is sent; the first ``fail`` sends raise like a dropped connection."""

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail = fail

    async def send(self, text: str) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionResetError("connection lost")
        self.sent.append(json.loads(text))


async def test_an_answer_typed_while_disconnected_is_queued_and_sent_on_reconnect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    c, _ = paused_console(live=False)
    assert not c.connected
    c.answer("y\n")
    err = capsys.readouterr().err
    assert "not connected: budget_continue for 5b0e5a4e queued, sent when reconnected" in err
    assert [cmd["type"] for cmd in c._outbox] == ["budget_continue"]

    # The first connection drops while sending: the answer must stay queued.
    with pytest.raises(ConnectionResetError):
        await c._send_loop(FakeWs(fail=1))
    assert [cmd["type"] for cmd in c._outbox] == ["budget_continue"]

    ws = FakeWs()
    sender = asyncio.create_task(c._send_loop(ws))
    await eventually(lambda: ws.sent, 2, "the queued answer sent")
    await cancel_and_wait(sender)
    assert ws.sent == [{"type": "budget_continue", "request_id": RID, "command_id": "tail-1"}]
    assert not c._outbox


def test_answers_beyond_the_bound_are_refused_out_loud(capsys: pytest.CaptureFixture[str]) -> None:
    c = Console("ws://unused", request_ids=[], interactive=True, out=io.StringIO())
    rids = [str(uuid.uuid4()) for _ in range(OUTBOX_MAX + 1)]
    for rid in rids:
        c.on_message(json.dumps(frame("budget_warning", rid=rid, tokens_used=8, budget_total=10)))
    for _ in rids:
        c.answer("n\n")
    assert len(c._outbox) == OUTBOX_MAX
    assert c.prompts == [rids[-1]], "the refused answer's question is still open"
    err = capsys.readouterr().err
    assert f"budget_stop for {rids[-1][:8]} NOT sent: not connected" in err


# ---------------------------------------------------------------- hostile text


def test_escape_sequences_in_frames_never_reach_the_terminal() -> None:
    hostile = "Research\x1b]0;owned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\x9b31m\r"
    c, out = console()
    c.on_message(json.dumps(spawned(ROOT, None, task=hostile)))
    c.on_message(
        json.dumps(frame("agent_failed", agent_id=ROOT, error="\x1bc\x1b[1A", will_retry=False))
    )
    c.on_message(json.dumps({"type": "error", "code": "x\x1b[5n", "message": "\x90q\x9c"}))
    text = out.getvalue()
    assert "Research [00000000]" in text
    assert not any(ch in text for ch in "\x1b\x07\r\x9b\x90\x9c"), repr(text)


def test_raw_json_mode_strips_c1_controls_json_carries_unescaped() -> None:
    c, out = console(raw_json=True)
    c.on_message('{"type":"synthesis_started","request_id":"%s","x":"a\u009b2Jb"}' % RID)
    assert out.getvalue() == '{"type":"synthesis_started","request_id":"%s","x":"ab"}\n' % RID


# ---------------------------------------------------------------- late join: snapshot


def snapshot_frame() -> dict[str, Any]:
    def agent(aid: str, parent: str | None, status: str, **more: Any) -> dict[str, Any]:
        return {"agent_id": aid, "parent_id": parent, "task_description": f"task {aid[0]}",
                "depth": 0 if parent is None else 1, "index": more.pop("index", 0),
                "total": more.pop("total", 1), "status": status, "tokens_used": 0,
                **more}  # fmt: skip

    return {
        "type": "snapshot", "request_id": RID, "epoch": "e1", "seq": 4000,
        "agents": [
            agent(ROOT, None, "running"),
            agent(A, ROOT, "completed", index=0, total=2, tokens_used=120, duration_ms=1500,
                  result_summary="done"),
            agent(B, ROOT, "running", index=1, total=2),
        ],
        "budget": {"tokens_used": 1200, "budget_total": 10_000},
        "pending_decision": None, "last_decision": None, "synthesis_started": False,
        "outcome": None, "text_seq": 4000,
        "texts": {
            ROOT: {"text": "plan:\n  first   second", "truncated": False, "bytes": 22},
            B: {"text": "x" * 300 + " the latest words", "truncated": True, "bytes": 90_000},
            C: {"text": "no spawn seen", "truncated": False, "bytes": 13},
        },
    }  # fmt: skip


def test_a_snapshot_draws_the_tree_with_each_agents_latest_text() -> None:
    lines = TreeRenderer().feed(snapshot_frame())
    assert lines[:3] == [
        "snapshot of 5b0e5a4e at seq 4000",
        f"task 0 [{ROOT[:8]}]",
        f"┊ [{ROOT[:8]}] plan: first second",
    ]
    assert lines[3] == f"├── task 1 [{A[:8]}] (1/2)"
    assert lines[4] == f"│   ✓ [{A[:8]}] completed in 1.5s, 120 tokens: done"
    assert lines[5] == f"└── task 2 [{B[:8]}] (2/2)"
    # A long or cut text shows its end, marked as such.
    assert lines[6].startswith(f"    ┊ [{B[:8]}] …x") and lines[6].endswith("x the latest words")
    assert len(lines[6]) < 300
    assert lines[7] == f"┊ [{C[:8]}] no spawn seen"
    assert lines[8] == "[tokens: 1,200 / 10,000]"


def test_live_events_after_a_snapshot_draw_under_its_tree() -> None:
    r = TreeRenderer()
    r.feed(snapshot_frame())
    assert r.feed(frame("agent_cancelled", agent_id=B, reason="stop")) == [
        f"    ⊘ [{B[:8]}] cancelled: stop"
    ]


class FakeSocket(FakeWs):
    """A connection that closes at once after the subscriptions were sent."""

    def __aiter__(self) -> FakeSocket:
        return self

    async def __anext__(self) -> str:
        raise StopAsyncIteration


async def test_tail_joins_with_a_snapshot_and_resumes_after_it() -> None:
    c, _ = console()
    first = FakeSocket()
    await c._serve(first)
    assert first.sent == [{"type": "subscribe", "request_id": RID, "snapshot": True}]
    c.on_message(json.dumps({"type": "subscribed", "request_id": RID, "epoch": "e1", "seq": 3990}))
    c.on_message(json.dumps(snapshot_frame()))
    assert c.last_seq == {RID: 4000} and c._roots == {RID: ROOT}
    again = FakeSocket()
    await c._serve(again)
    assert again.sent == [{"type": "subscribe", "request_id": RID, "after_seq": 4000,
                           "epoch": "e1"}]  # fmt: skip
    explicit, _ = console(after_seq=5)
    resumed = FakeSocket()
    await explicit._serve(resumed)
    assert resumed.sent == [{"type": "subscribe", "request_id": RID, "after_seq": 5}]
