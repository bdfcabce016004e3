"""The relay command against a real redis-server, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.support import RedisServer

AGENT = str(uuid.uuid4())


def relay(
    redis: RedisServer, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_REDIS_URL"] = redis.url
    env["RELAY_REDIS_PUBLISH_RETRY_SECONDS"] = "1"
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
