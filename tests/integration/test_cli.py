"""The relay command against a real redis-server, run as a user runs it."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway, RedisServer, RelayProcess, wait_for

AGENT = str(uuid.uuid4())


def relay(
    redis: RedisServer, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_REDIS_URL"] = redis.url
    env["RELAY_REDIS_PUBLISH_RETRY_SECONDS"] = "1"
    env["RELAY_AUTH_MODE"] = "none"
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_publish_from_an_argument_and_from_stdin(redis_server: RedisServer) -> None:
    rid = str(uuid.uuid4())
    delta = json.dumps({"type": "agent_text_delta", "agent_id": AGENT, "text": "hi"})
    first = relay(redis_server, "publish", rid, delta)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["1"]
    second = relay(redis_server, "publish", rid, stdin=f"{delta}\n{delta}\n")
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["2", "3"]
    history = redis_server.command("XLEN", f"relay:default:req:{{{rid}}}:history")
    assert history.strip() == b"3"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["publish", "not-a-uuid", "{}"], "not a valid UUID"),
        (["publish", str(uuid.uuid4()), "{nope"], "not valid JSON"),
        (["publish", str(uuid.uuid4()), '{"type":"agent_text_delta","agent_id":"x","text":"t"}'],
         "agent_id"),
        (["publish", str(uuid.uuid4()), '{"type":"dance"}'], "dance"),
    ],
)  # fmt: skip
def test_bad_events_exit_2_and_name_the_problem(
    redis_server: RedisServer, args: list[str], needle: str
) -> None:
    result = relay(redis_server, *args)
    assert result.returncode == 2
    assert needle in result.stderr


def test_cancel_writes_a_tombstone(redis_server: RedisServer) -> None:
    target = str(uuid.uuid4())
    result = relay(redis_server, "cancel", target, "--reason", "enough")
    assert result.returncode == 0, result.stderr
    stored = json.loads(redis_server.command("GET", f"relay:default:cancel:{{{target}}}"))
    assert stored["target_id"] == target and stored["reason"] == "enough"
    again = relay(redis_server, "cancel", target)
    assert "already cancelled" in again.stdout


def test_budget_answer_without_a_pause_fails_clearly(redis_server: RedisServer) -> None:
    rid = str(uuid.uuid4())
    for verb in ("continue", "stop"):
        result = relay(redis_server, verb, rid)
        assert result.returncode == 1
        assert f"no budget decision is pending for request {rid}" in result.stderr


def test_unreachable_redis_is_a_clear_failure(tmp_path: object) -> None:
    dead = RedisServer.__new__(RedisServer)
    dead.port = 1  # nothing listens there
    result = relay(dead, "cancel", str(uuid.uuid4()))
    assert result.returncode == 1
    assert "Redis at redis://127.0.0.1:1/0 failed" in result.stderr


def test_schema_is_json(redis_server: RedisServer) -> None:
    result = relay(redis_server, "schema")
    assert result.returncode == 0
    assert "agent_spawned" in json.dumps(json.loads(result.stdout))


# ---------------------------------------------------------------- relay tail and signals


def ignore_sigint() -> None:  # pragma: no cover - runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tail_started_with_sigint_ignored_still_stops_on_a_signal(
    start_gateway: Callable[..., Gateway], tmp_path: Path, sig: int
) -> None:
    """As `relay tail ... &` in a script or under nohup: SIGINT arrives as SIG_IGN."""
    gw = start_gateway()
    log = tmp_path / "tail.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "tail", gw.ws_url, "--no-input"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=ignore_sigint,
        )  # fmt: skip
    try:
        wait_for(lambda: "connected to" in log.read_text(), 15, what="tail connected")
        proc.send_signal(sig)
        assert proc.wait(5) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in log.read_text()


# ---------------------------------------------------------------- relay gateway on a busy port


def test_gateway_on_a_busy_port_names_it_and_exits_3(redis_server: RedisServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = relay(redis_server, "gateway", "--port", str(port))
    assert result.returncode == 3, result.stderr
    assert f"relay: cannot listen on 127.0.0.1:{port}: the address is already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "3 the gateway could not start" in relay(redis_server, "--help").stdout


# ---------------------------------------------------------------- id prefixes


def uid(head: str) -> str:
    """A UUID starting with the hex digits ``head`` (the rest random)."""
    rest = uuid.uuid4().hex
    return str(uuid.UUID(head + rest[len(head) :]))


def spawn(redis: RedisServer, rid: str, agent: str, parent: str | None) -> None:
    depth = 0 if parent is None else 1
    event = {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
             "task_description": "t", "depth": depth, "index": 0, "total": 1}  # fmt: skip
    result = relay(redis, "publish", rid, json.dumps(event))
    assert result.returncode == 0, result.stderr


def tombstone(redis: RedisServer, target: str) -> dict[str, Any]:
    stored = redis.command("GET", f"relay:default:cancel:{{{target}}}").strip()
    return dict(json.loads(stored)) if stored else {}


def test_cancel_accepts_a_unique_prefix_and_explains_the_rest(redis_server: RedisServer) -> None:
    first, second = uid("a1b2c3d4e5"), uid("f0e1d2c3")
    root1, root2 = uid("0abc0abc"), uid("0abc0abd")
    twin1, twin2 = uid("7777aaaa1"), uid("7777aaaa2")  # same first 8 characters
    spawn(redis_server, first, root1, None)
    spawn(redis_server, first, twin1, root1)
    spawn(redis_server, second, root2, None)
    spawn(redis_server, second, twin2, root2)

    # The 8 characters relay tail shows, for an agent and for a request.
    result = relay(redis_server, "cancel", root1[:8])
    assert result.returncode == 0, result.stderr
    assert f"cancel of agent {root1} of request {first} recorded" in result.stdout
    assert tombstone(redis_server, root1)["target_id"] == root1
    result = relay(redis_server, "cancel", first[:8].upper())
    assert result.returncode == 0, result.stderr
    assert f"cancel of request {first} recorded" in result.stdout

    result = relay(redis_server, "cancel", "7777aaaa")
    assert result.returncode == 1
    assert "7777aaaa is ambiguous (2 matches: agent " in result.stderr
    assert twin1 in result.stderr and twin2 in result.stderr
    assert not tombstone(redis_server, twin1) and not tombstone(redis_server, twin2)

    # Narrowed to one request (itself given by a prefix), the prefix is unique.
    result = relay(redis_server, "cancel", "7777aaaa", "--request", second[:8])
    assert result.returncode == 0, result.stderr
    assert tombstone(redis_server, twin2) and not tombstone(redis_server, twin1)
    # Hyphens may be kept or left out.
    result = relay(redis_server, "cancel", twin1[:13])
    assert result.returncode == 0, result.stderr
    assert tombstone(redis_server, twin1)["target_id"] == twin1

    result = relay(redis_server, "cancel", "0abc0")
    assert result.returncode == 1 and "0abc0 is ambiguous (2 matches" in result.stderr
    result = relay(redis_server, "cancel", "deadbeef")
    assert result.returncode == 1
    assert "no id starts with deadbeef (searched the 500 most recently active" in result.stderr
    result = relay(redis_server, "cancel", "deadbeef", "--request", first)
    assert result.returncode == 1
    assert f"no id starts with deadbeef (searched request {first} and its agents)" in result.stderr
    for bad in ("abc", "not-hex!"):
        result = relay(redis_server, "cancel", bad)
        assert result.returncode == 2, result.stderr
        assert f"{bad!r} is neither a UUID nor an id prefix" in result.stderr
    result = relay(redis_server, "cancel", "deadbeef", "--request", str(uuid.uuid4()))
    assert result.returncode == 1 and "has no state in Redis" in result.stderr


def test_budget_answers_accept_a_request_prefix(redis_server: RedisServer) -> None:
    rid = uid("5eed5eed")
    spawn(redis_server, rid, uid("1234abcd"), None)
    result = relay(redis_server, "continue", rid[:8])
    assert result.returncode == 1
    assert f"no budget decision is pending for request {rid}" in result.stderr
    result = relay(redis_server, "stop", "1234abcd")
    assert result.returncode == 1, "an agent id is no request"
    assert "no id starts with 1234abcd" in result.stderr


# ---------------------------------------------------------------- relay tail on a terminal


class TailOnPty:
    """``relay tail`` with a pseudo-terminal as stdin, stdout and stderr: live and interactive."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "tail", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.seen = b""

    def output(self) -> str:
        """Everything written to the terminal so far (reads what is pending)."""
        while self.master >= 0 and select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the child closed its side
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        try:
            wait_for(lambda: needle in self.output(), timeout, what=repr(needle))
        except TimeoutError:
            raise AssertionError(f"{needle!r} never shown:\n{self.output()[-3000:]!r}") from None

    def status_line(self) -> str:
        """What the live status line shows now: the text after tail's last line clear."""
        return self.output().rsplit("\r\x1b[K", 1)[-1]

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.output()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        return self.proc.returncode


@pytest.fixture
def tails() -> Iterator[list[TailOnPty]]:
    started: list[TailOnPty] = []
    yield started
    for tail in started:
        if tail.proc.poll() is None:
            tail.close()


HOSTILE = "Plan\x1b]0;pwned\x07\x1b[2J\x1b]52;c;Y3VybCBldmlsLnNo\x07\x9b1A"


def test_tail_on_a_terminal_drops_a_moot_prompt_and_disarms_escapes(
    start_gateway: Callable[..., Gateway], redis_server: RedisServer, tails: list[TailOnPty]
) -> None:
    gw = start_gateway()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    tail = TailOnPty(gw.ws_url, "--request-id", rid)
    tails.append(tail)
    tail.wait_for("subscribed to")
    spawned = {"type": "agent_spawned", "agent_id": root, "parent_id": None,
               "task_description": HOSTILE, "depth": 0, "index": 0, "total": 1}  # fmt: skip
    warning = {"type": "budget_warning", "request_id": rid, "tokens_used": 8000,
               "budget_total": 10000}  # fmt: skip
    assert relay(redis_server, "publish", rid, json.dumps(spawned)).returncode == 0
    assert relay(redis_server, "publish", rid, json.dumps(warning)).returncode == 0
    tail.wait_for("Continue? [y/n]")
    assert "Continue? [y/n]" in tail.status_line()

    # The request ends without a decision (its root was cancelled mid-pause).
    ended = {"type": "agent_cancelled", "agent_id": root, "reason": "gone\x1b[1A\x1b[2K"}
    assert relay(redis_server, "publish", rid, json.dumps(ended)).returncode == 0
    tail.wait_for(f"⊘ [{root[:8]}] cancelled: gone")
    wait_for(lambda: "Continue?" not in tail.status_line(), 5, what="the prompt cleared")
    assert tail.close() == 0
    out = tail.output()
    assert f"Plan [{root[:8]}]" in out
    # tail's own line clears are the only escape sequences on the terminal.
    assert out.replace("\r\x1b[K", "").count("\x1b") == 0, repr(out)
    assert not any(c in out for c in "\x07\x9b"), repr(out)


def test_tail_on_a_terminal_sends_an_answer_typed_while_disconnected_on_reconnect(
    start_gateway: Callable[..., Gateway],
    gateways: list[Gateway],
    redis_server: RedisServer,
    tails: list[TailOnPty],
    tmp_path: Path,
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    tail = TailOnPty(gw.ws_url, "--request-id", rid)
    tails.append(tail)
    tail.wait_for("subscribed to")
    sim = RelayProcess(
        ["simulate", "--request-id", rid, "--seed", "42", "--agents", "3", "--budget", "10000",
         "--deltas", "30", "--delta-interval", "0.05", "--decision-timeout", "60"],
        {"RELAY_REDIS_URL": redis_server.url}, tmp_path / "simulate.log",
    ).start()  # fmt: skip
    try:
        tail.wait_for("Continue? [y/n]", 60)
        gw.stop()
        tail.wait_for("reconnecting in")
        tail.type("y\n")
        tail.wait_for("not connected: budget_continue for")
        tail.wait_for("queued, sent when reconnected")

        # The same address comes back (a restarted gateway): the answer goes out.
        again = Gateway(redis_server.url, tmp_path / "gateway-again.log",
                        {"RELAY_GATEWAY_PORT": str(gw.port)})  # fmt: skip
        again.port = gw.port
        gateways.append(again)
        again.start()
        tail.wait_for("✓ budget_continue accepted", 30)
        assert sim.wait(60) == 0, sim.output()
        assert (
            "completed" in [ln for ln in sim.output().splitlines() if ln.startswith("request ")][-1]
        )
    finally:
        sim.stop(signal.SIGKILL)
    assert tail.close() == 0
