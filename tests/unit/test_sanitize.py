"""Untrusted text (LLM output, task descriptions, errors) cannot drive the terminal."""

from __future__ import annotations

import random
from typing import Any

import pytest

from relay.tools.render import TreeRenderer, sanitize

ATTACKS = [
    # (name, hostile text, what the terminal must show instead)
    ("OSC 0 window title, BEL", "a\x1b]0;you have been pwned\x07b", "ab"),
    ("OSC 2 window title, ST", "a\x1b]2;title\x1b\\b", "ab"),
    ("OSC 52 clipboard write", "copy\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07this", "copythis"),
    (
        "OSC 8 hyperlink to elsewhere",
        "\x1b]8;;https://evil.example/\x1b\\docs\x1b]8;;\x1b\\",
        "docs",
    ),
    ("clear screen and home", "x\x1b[2J\x1b[Hy", "xy"),
    ("clear scrollback", "\x1b[3Jkept", "kept"),
    ("full reset (RIS)", "\x1bcafter", "after"),
    ("cursor up, erase line: overwrite an earlier line", "\x1b[1A\x1b[2K✓ all good", "✓ all good"),
    ("alternate screen", "\x1b[?1049hhidden", "hidden"),
    ("colours", "\x1b[31;1mred\x1b[0m", "red"),
    ("device status report (reply lands on stdin)", "\x1b[6n?", "?"),
    ("DCS XTGETTCAP request", "\x1bP+q544e\x1b\\z", "z"),
    ("charset switch to line drawing", "\x1b(0qqq\x1b(B", "qqq"),
    ("8-bit CSI", "\x9b2Jtext", "text"),
    ("8-bit OSC title with 8-bit ST", "\x9d0;title\x9cok", "ok"),
    ("unterminated OSC swallows the rest", "before\x1b]0;never ends", "before"),
    ("carriage return overwrite", "rm -rf /\rls", "rm -rf /ls"),
    ("backspaces", "abc\x08\x08\x08xyz", "abcxyz"),
    ("bell, NUL, DEL, vertical tab, form feed", "\x07a\x00b\x7fc\x0bd\x0ce", "abcde"),
    ("lone ESC at the end", "trailing\x1b", "trailing"),
]


@pytest.mark.parametrize(
    ("hostile", "shown"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_strings_are_disarmed(hostile: str, shown: str) -> None:
    assert sanitize(hostile) == shown


def test_ordinary_text_passes_unchanged() -> None:
    for text in ["plain", "tab\tand\nnewline", "é ñ 日本語 ✓ ⚠ 🙂", "├── └── │", "[tokens: 1,000]"]:
        assert sanitize(text) == text


def test_no_control_character_survives_random_input() -> None:
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x00, 0xA0)] + ["é", "✓", "[", "]", ";", "\\"]
    allowed_controls = {"\n", "\t"}
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out = sanitize(text)
        bad = [
            c for c in out if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) and c not in allowed_controls
        ]
        assert not bad, (text, out)
        assert sanitize(out) == out


def test_every_rendered_line_is_sanitised() -> None:
    hostile = "\x1b]0;owned\x07Plan\x1b[2J"
    r = TreeRenderer()
    agent = "00000000-0000-4000-8000-000000000000"
    frames: list[dict[str, Any]] = [
        {"type": "agent_spawned", "agent_id": agent, "parent_id": None, "task_description": hostile,
         "depth": 0, "index": 0, "total": 1},
        {"type": "agent_failed", "agent_id": agent, "error": hostile, "will_retry": False},
        {"type": "memory_created", "agent_id": agent, "fact": hostile},
        {"type": "cycle_detected", "agent_id": agent, "cycle_description": hostile},
        {"type": "provider_failover", "from_provider": hostile, "to_provider": "b",
         "reason": hostile},
        {"type": "workflow_run_failed", "workflow_name": hostile, "error": hostile},
        {"type": "error", "code": hostile, "message": hostile},
        {"type": "budget_decision", "decision": hostile, "decided_by": hostile},
        {"type": "resync_required", "request_id": hostile, "reason": hostile},
    ]  # fmt: skip
    lines = [line for f in frames for line in r.feed(f)]
    assert len(lines) == len(frames)
    assert lines[0] == "Plan [00000000]"
    for line in lines:
        assert "\x1b" not in line and "\x07" not in line, repr(line)
