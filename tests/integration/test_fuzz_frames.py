"""Property-based fuzzing of the command path: >= 10,000 hostile frames over a real WebSocket.

Hypothesis generates frames of every kind a client can send: random JSON,
random text, random bytes as binary frames, valid commands with mutated,
dropped and added fields, huge and non-finite numbers, deep nesting, lone
surrogate escapes, oversized frames. Each frame is sent to a real gateway
process followed by a sentinel ``ping``; everything that arrives before the
sentinel's ``pong`` is the answer to the frame. The properties:

* the gateway never crashes or closes the connection, and never logs a traceback;
* every frame that expects an answer gets one (a reply or an error frame),
  with its ``command_id`` echoed whenever the frame is a JSON object carrying
  a valid one; the one command documented to need no reply
  (``unsubscribe_workflow`` without ``command_id``) gets none;
* the gateway's RSS stays flat after warm-up, and its log stays bounded.

The expected answer is computed with relay's own parser as the oracle
(:func:`relay.wire.commands.parse_command`). The command rate limit is raised for
this test: it is about the command path, not the limit (tested elsewhere).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from relay.wire.commands import CommandError, UnsubscribeWorkflow, load_object, parse_command
from tests.integration.limits_support import rss_mb
from tests.support import Gateway, RedisServer, metric

StartGateway = Callable[..., Gateway]

MAX_MESSAGE = 64 * 1024
BATCH = 25
BATCHES = 420  # 10,500 frames

COMMAND_TYPES = [
    "ping",
    "cancel_agent",
    "budget_continue",
    "budget_stop",
    "subscribe_workflow",
    "unsubscribe_workflow",
    "subscribe",
    "unsubscribe",
]

uuids = st.uuids().map(str)
huge_ints = st.integers(min_value=-(10**40), max_value=10**40)
json_scalars = (
    st.none()
    | st.booleans()
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def base_command(kind: str, ids: dict[str, str]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {
        "ping": {},
        "cancel_agent": {"agent_id": ids["a"], "reason": "fuzz"},
        "budget_continue": {"request_id": ids["r"], "pause_id": "p1"},
        "budget_stop": {"request_id": ids["r"]},
        "subscribe_workflow": {"run_id": ids["w"]},
        "unsubscribe_workflow": {"run_id": ids["w"]},
        "subscribe": {"request_id": ids["r"], "after_seq": 0, "snapshot": False},
        "unsubscribe": {"request_id": ids["r"]},
    }
    return {"type": kind, **table[kind]}


@st.composite
def mutated_command(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(COMMAND_TYPES))
    cmd = base_command(kind, {"a": draw(uuids), "r": draw(uuids), "w": draw(uuids)})
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "id", "none"]))
        keys = sorted(cmd)
        if not keys:
            action = "add"
        if action == "replace":
            cmd[draw(st.sampled_from(keys))] = draw(json_values)
        elif action == "drop":
            cmd.pop(draw(st.sampled_from(keys)), None)
        elif action == "add":
            cmd[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "id":
            cmd["command_id"] = draw(huge_ints | st.text(max_size=20) | json_values)
    return cmd


def surrogate(text: str) -> str:
    """A JSON text with a lone surrogate escape spliced into its first string."""
    return text.replace('"', '"\\ud800', 1) if '"' in text else text + '"\\udc00"'


text_frames = st.one_of(
    json_values.map(lambda v: json.dumps(v)),
    mutated_command().map(json.dumps),
    mutated_command().map(json.dumps).map(surrogate),
    st.text(max_size=200),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 200).map(lambda n: '{"type":"ping","x":' + "[" * n + "]" * n + "}"),
    st.integers(MAX_MESSAGE - 50, MAX_MESSAGE + 5000).map(
        lambda n: '{"type":"ping","command_id":1,"pad":"' + "x" * n + '"}'
    ),
)
binary_frames = st.one_of(
    st.binary(max_size=200),
    mutated_command().map(lambda c: json.dumps(c).encode()),
)
frames = st.one_of(text_frames, text_frames, text_frames, binary_frames)


def expectation(frame: str | bytes) -> tuple[bool, Any]:
    """(whether the frame must be answered, the command_id the answer must echo or None)."""
    if len(frame) > MAX_MESSAGE:
        return True, None
    try:
        raw = load_object(frame)
    except CommandError:
        return True, None
    cid = raw.get("command_id")
    if isinstance(cid, bool) or not isinstance(cid, str | int):
        cid = None
    try:
        command = parse_command(frame)
    except CommandError:
        return True, cid
    return not (isinstance(command, UnsubscribeWorkflow) and command.command_id is None), cid


class Fuzzer:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.sent = 0
        self.answered = 0
        self.silent = 0
        self.n = 0

    def exchange(self, frame: str | bytes) -> list[dict[str, Any]]:
        """Send ``frame`` and a sentinel ping; the frames that came before the sentinel's pong."""
        self.n += 1
        sentinel = f"sentinel-{self.n}"
        self.ws.send(frame)
        self.ws.send(json.dumps({"type": "ping", "command_id": sentinel}))
        self.sent += 1
        got: list[dict[str, Any]] = []
        while True:
            reply = json.loads(self.ws.recv(timeout=10))
            if reply.get("command_id") == sentinel and reply.get("type") == "pong":
                return got
            got.append(reply)

    def check(self, frame: str | bytes) -> None:
        must_answer, cid = expectation(frame)
        got = self.exchange(frame)
        if not must_answer:
            assert got == [], (frame[:200], got)
            self.silent += 1
            return
        assert got, f"no answer to {frame[:200]!r}"
        self.answered += 1
        if cid is not None:
            assert got[0].get("command_id") == cid, (frame[:200], got[0])
        for reply in got:
            assert isinstance(reply.get("type"), str), reply


@pytest.mark.timeout(180)
# A failing batch holds 64 KiB frames; the assertion names the frame, not the repr.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_ten_thousand_hostile_frames(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {
            "RELAY_LIMITS_COMMAND_RATE": "1000000",
            "RELAY_LIMITS_COMMAND_BURST": "1000000",
        }
    )
    started = time.monotonic()
    with connect(gw.ws_url + "?stream=none", max_size=None) as ws:
        fuzz = Fuzzer(ws)
        marks: dict[str, float] = {}

        @settings(
            max_examples=BATCHES,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # bounded time: no shrinking against a live process
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(frames, min_size=BATCH, max_size=BATCH))
        def batch(items: list[str | bytes]) -> None:
            for frame in items:
                fuzz.check(frame)
            if fuzz.sent >= 2000 and "rss" not in marks:
                marks["rss"] = rss_mb(gw)
                marks["lines"] = gw.output().count("\n")

        batch()
        # The connection is still usable and in its own state.
        ws.send(json.dumps({"type": "ping", "command_id": "end"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "command_id": "end"}
    took = time.monotonic() - started
    assert fuzz.sent >= 10_000, fuzz.sent
    assert gw.alive() and gw.ready()
    rss_end = rss_mb(gw)
    lines = gw.output().count("\n")
    log = gw.output()
    assert "Traceback" not in log, log[-3000:]
    assert metric(gw, "relay_internal_errors_total") == 0
    # Flat memory after warm-up; a bounded log (connection lines, once-per-cause
    # warnings, and the cancels the per-subject cancel limit let through).
    assert rss_end - marks["rss"] < 15, (marks["rss"], rss_end)
    assert lines - marks["lines"] < 400, lines - marks["lines"]
    print(
        f"\nfuzz: {fuzz.sent} frames in {took:.1f}s, {fuzz.answered} answered, "
        f"{fuzz.silent} silent by contract; rss {marks['rss']:.1f} -> {rss_end:.1f} MB; "
        f"log +{lines - marks['lines']} lines after warm-up ({lines} in all)"
    )


def test_oracle_knows_the_silent_command() -> None:
    """The oracle itself: only unsubscribe_workflow without command_id is silent."""
    run = str(uuid.uuid4())
    assert expectation(json.dumps({"type": "unsubscribe_workflow", "run_id": run})) == (False, None)
    frame = json.dumps({"type": "unsubscribe_workflow", "run_id": run, "command_id": 7})
    assert expectation(frame) == (True, 7)
    assert expectation('{"type":"nope","command_id":"x"}') == (True, "x")
    assert expectation(b"\xff") == (True, None)
