"""Helpers of the AG-UI integration tests: read a run's SSE stream, and what Redis holds."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from relay.gateway.auth import mint_token
from relay.wire.keys import Keys
from tests.agui_checks import client_messages
from tests.support import Gateway, RelayProcess

Events = list[dict[str, Any]]

SECRET = "agui-secret-" + "s" * 32

# Long enough to cut midway, short enough for a test; the budget is small
# enough that the run reaches the warning (a pause) before it ends.
PAUSING = ("--agents", "4", "--depth", "2", "--budget", "20000", "--tokens-per-delta", "600")
QUIET = ("--tokens-per-delta", "1", "--seed", "7")  # never reaches the warning


def simulate(redis_url: str, workdir: Path, rid: str, *args: str) -> RelayProcess:
    """A simulated orchestrator running request ``rid``."""
    proc = RelayProcess(
        ["simulate", "--request-id", rid, *args],
        {"RELAY_REDIS_URL": redis_url, "RELAY_CANCEL_POLL_INTERVAL": "0.5"},
        workdir / f"simulate-{rid[:8]}.log",
    )
    return proc.start()


def simulations(redis_url: str, workdir: Path) -> Iterator[Callable[..., RelayProcess]]:
    """For a fixture: ``start(rid, *args)`` starts a simulated orchestrator; all are
    killed when the fixture ends."""
    started: list[RelayProcess] = []

    def start(rid: str, *args: str) -> RelayProcess:
        started.append(simulate(redis_url, workdir, rid, *args))
        return started[-1]

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL)


def run_body(run_id: str, **more: Any) -> dict[str, Any]:
    """A ``RunAgentInput``."""
    return {"threadId": "thread-1", "runId": run_id, "messages": [], **more}


async def read_run(
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    stop: Callable[[Events], bool] | None = None,
    timeout: float = 60.0,
) -> tuple[int, Events]:
    """POST one run and read its events until the stream ends (or ``stop`` says so).

    Returns the HTTP status and the events (for a non-200 answer: its JSON body).
    """
    events: Events = []
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        client.stream("POST", url, json=body, headers=headers or {}) as resp,
    ):
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.json()]
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-accel-buffering"] == "no"
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if stop is not None and stop(events):
                    break
    return 200, events


def history(redis_url: str, rid: str, tenant: str = "default") -> Events:
    """Every frame of the request's history, in seq order."""
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(Keys(tenant).request(rid).history)
    finally:
        client.close()
    return [json.loads(fields[b"f"]) for _, fields in entries or [] if fields is not None]


def texts(frames: Events) -> dict[str, str]:
    """Each agent's whole text, keyed by its AG-UI message id."""
    out: dict[str, str] = {}
    for f in frames:
        if f["type"] == "agent_text_delta":
            key = f"msg-{f['agent_id']}"
            out[key] = out.get(key, "") + f["text"]
    return out


def url(gw: Gateway, rid: str) -> str:
    return f"{gw.http}/agui/requests/{rid}"


def contents(events: Events) -> dict[str, str]:
    return {m["id"]: m["content"] for m in client_messages(events) if m["role"] == "assistant"}


def jwt_env() -> dict[str, str]:
    return {"RELAY_AUTH_MODE": "jwt", "RELAY_AUTH_JWT_SECRET": SECRET}


def bearer(caps: tuple[str, ...] = ("view", "cancel", "decide"), **more: Any) -> dict[str, str]:
    token = mint_token(SECRET, tenant="default", caps=caps, sub="ops", ttl_seconds=600, **more)
    return {"Authorization": f"Bearer {token}"}


def spawned_event(aid: str) -> dict[str, Any]:
    return {
        "type": "agent_spawned",
        "agent_id": aid,
        "parent_id": None,
        "task_description": "bulk",
        "depth": 0,
        "index": 0,
        "total": 1,
    }
