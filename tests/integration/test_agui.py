"""``POST /agui/requests/{id}`` against real redis-server and gateway processes.

The AG-UI stream of simulated runs: verified run by run (the official
models and the client's rules, tests/unit/test_agui_map.py), compared with
what Redis holds, cut and resumed, paused and answered, and refused the way
the WebSocket refuses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import HistoryConfig
from relay.gateway.auth import mint_token
from relay.orchestrator.client import RelayClient
from tests.integration.agui_support import (
    PAUSING,
    QUIET,
    Events,
    history,
    read_run,
    run_body,
    simulate,
    texts,
)
from tests.support import Gateway, RedisServer, RelayProcess, eventually, metric
from tests.unit.test_agui_map import apply, client_messages, verify

pytestmark = pytest.mark.integration

SECRET = "agui-secret-" + "s" * 32
SHORT = ("--agents", "3", "--depth", "2", "--deltas", "8", "--delta-interval", "0.005")
MEDIUM = ("--agents", "3", "--depth", "2", "--deltas", "30", "--delta-interval", "0.02")


def url(gw: Gateway, rid: str) -> str:
    return f"{gw.http}/agui/requests/{rid}"


async def finished(proc: RelayProcess, timeout: float = 60) -> None:
    await eventually(lambda: not proc.alive(), timeout, "simulate to exit")
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def sim(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """``sim(rid, *args)`` starts a simulated orchestrator; all are stopped at the end."""
    started: list[RelayProcess] = []

    def start(rid: str, *args: str) -> RelayProcess:
        started.append(simulate(redis_server.url, tmp_path, rid, *args))
        return started[-1]

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL)


def contents(events: Events) -> dict[str, str]:
    return {m["id"]: m["content"] for m in client_messages(events) if m["role"] == "assistant"}


async def test_a_finished_request_is_one_verified_run_with_every_agents_text(
    redis_server: RedisServer, start_gateway: Any, sim: Any
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    await finished(sim(rid, *SHORT, *QUIET))
    # Position 0, explicitly: the whole history is replayed (a first attach
    # renders from the snapshot instead when it carries every agent's text).
    replay = {"relay": {"after_seq": 0}}
    status, events = await read_run(url(gw, rid), run_body("r1", forwardedProps=replay))
    assert status == 200
    verify(events)
    frames = history(redis_server.url, rid)
    assert contents(events) == texts(frames)
    state = apply(None, events)
    assert state["relay"]["seq"] == frames[-1]["seq"]
    assert {a["status"] for a in state["agents"].values()} == {"completed"}
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"] == {"type": "success"}
    subagents = [e for e in events if e["type"] == "SUBAGENT_STARTED"]
    assert len(subagents) == len(state["agents"]) - 1  # every agent but the root


async def test_a_run_cut_anywhere_resumes_without_repeating_or_skipping(
    redis_server: RedisServer, start_gateway: Any, sim: Any
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    proc = sim(rid, *MEDIUM, *QUIET)
    seen: Events = []
    state: Any = None
    runs = 0
    while not seen or seen[-1]["type"] != "RUN_FINISHED":
        want = 5 + (runs * 13) % 37  # cuts at many different places

        def cut(evs: Events, want: int = want) -> bool:
            # At the end of one relay event's AG-UI events, as a broken
            # connection cuts between two writes.
            return len(evs) >= want and evs[-1]["type"] in ("STATE_DELTA", "TEXT_MESSAGE_CONTENT")

        body = run_body(f"r{runs}")
        if state is not None:
            body.update(state=state, messages=client_messages(seen))
        status, events = await read_run(url(gw, rid), body, stop=cut)
        assert status == 200, events
        verify(events)
        state = apply(state, events)
        seen += events
        runs += 1
        assert runs < 200
    await finished(proc)
    assert runs > 3
    frames = history(redis_server.url, rid)
    assert contents(seen) == texts(frames)
    assert state["relay"]["seq"] == frames[-1]["seq"]
    results = Counter(e["messageId"] for e in seen if e["type"] == "TOOL_CALL_RESULT")
    assert results and set(results.values()) == {1}, results
    spawns = Counter(e["toolCallId"] for e in seen if e["type"] == "TOOL_CALL_START")
    assert set(spawns.values()) == {1}


def jwt_env() -> dict[str, str]:
    return {"RELAY_AUTH_MODE": "jwt", "RELAY_AUTH_JWT_SECRET": SECRET}


def bearer(caps: tuple[str, ...] = ("view", "cancel", "decide"), **more: Any) -> dict[str, str]:
    token = mint_token(SECRET, tenant="default", caps=caps, sub="ops", ttl_seconds=600, **more)
    return {"Authorization": f"Bearer {token}"}


async def test_a_budget_pause_is_an_interrupt_answered_by_the_next_runs_resume(
    redis_server: RedisServer, start_gateway: Any, sim: Any
) -> None:
    gw = start_gateway(jwt_env())
    rid = str(uuid.uuid4())
    proc = sim(rid, *PAUSING, "--decision-timeout", "60")
    status, first = await read_run(url(gw, rid), run_body("r1"), headers=bearer())
    assert status == 200
    verify(first)
    end = first[-1]
    assert end["type"] == "RUN_FINISHED" and end["outcome"]["type"] == "interrupt", end
    (interrupt,) = end["outcome"]["interrupts"]
    assert interrupt["reason"] == "relay:budget_pause"
    assert interrupt["expiresAt"].endswith("Z")
    state = apply(None, first)
    assert state["pending_decision"]["pause_id"] == interrupt["id"]
    answer = {"interruptId": interrupt["id"], "status": "resolved", "payload": {"decision": "stop"}}
    body = run_body("r2", state=state, messages=client_messages(first), resume=[answer])

    # A token without "decide" cannot answer: the run ends with RUN_ERROR.
    status, refused = await read_run(url(gw, rid), body, headers=bearer(("view",)))
    assert refused[-1]["type"] == "RUN_ERROR" and refused[-1]["code"] == "relay.forbidden"

    status, second = await read_run(url(gw, rid), body, headers=bearer())
    verify(second)
    assert second[-1]["type"] == "RUN_FINISHED" and second[-1]["outcome"] == {"type": "success"}
    state = apply(state, second)
    assert state["last_decision"] == {"decision": "stop", "decided_by": "client"}
    assert state["pending_decision"] is None
    await finished(proc)
    assert contents(first + second) == texts(history(redis_server.url, rid))


async def test_a_pause_answered_through_rest_lets_the_next_run_go_on(
    redis_server: RedisServer, start_gateway: Any, sim: Any
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    proc = sim(rid, *PAUSING, "--decision-timeout", "60")
    _, first = await read_run(url(gw, rid), run_body("r1"))
    interrupt = first[-1]["outcome"]["interrupts"][0]
    state = apply(None, first)
    messages = client_messages(first)

    # A run that does not address the open pause ends with it again, at once.
    _, again = await read_run(url(gw, rid), run_body("r2", state=state, messages=messages))
    verify(again)
    assert again[-1]["outcome"]["interrupts"][0]["id"] == interrupt["id"]
    assert not [e for e in again if e["type"] == "TEXT_MESSAGE_CONTENT"]

    assert gw.post(f"/api/v1/requests/{rid}/budget", {"decision": "continue"})[0] == 202
    gone = {"interruptId": interrupt["id"], "status": "cancelled"}
    body = run_body("r3", state=state, messages=messages, resume=[gone])
    _, rest = await read_run(url(gw, rid), body)
    verify(rest)
    assert rest[-1]["type"] == "RUN_FINISHED" and rest[-1]["outcome"] == {"type": "success"}
    assert apply(state, rest)["last_decision"] == {"decision": "continue", "decided_by": "client"}
    await finished(proc)
    assert contents(first + rest) == texts(history(redis_server.url, rid))


async def test_auth_and_tenancy_are_the_websockets(
    redis_server: RedisServer, start_gateway: Any, sim: Any
) -> None:
    gw = start_gateway(jwt_env())
    rid = str(uuid.uuid4())
    await finished(sim(rid, *SHORT, *QUIET))
    target = url(gw, rid)

    status, body = await read_run(target, run_body("r"))
    assert status == 401 and body[0]["code"] == "unauthorized"
    status, body = await read_run(target, run_body("r"), headers={"Authorization": "Bearer x.y.z"})
    assert status == 401 and body[0]["code"] == "invalid_token"
    status, body = await read_run(target, run_body("r"), headers=bearer(("cancel",)))
    assert status == 403 and body[0]["code"] == "forbidden"
    other = bearer(requests=(str(uuid.uuid4()),))
    status, body = await read_run(target, run_body("r"), headers=other)
    assert status == 403

    token = bearer()["Authorization"].split()[1]
    status, events = await read_run(f"{target}?token={token}", run_body("r"))
    assert status == 200 and events[-1]["type"] == "RUN_FINISHED"

    # Another tenant's token reaches another tenant's request of that id: nothing.
    elsewhere = mint_token(SECRET, tenant="t2", caps=("view",), sub="x", ttl_seconds=60)
    status, events = await read_run(
        target,
        run_body("r"),
        headers={"Authorization": f"Bearer {elsewhere}"},
        stop=lambda evs: len(evs) >= 2,
    )
    assert status == 200
    assert events[1]["snapshot"]["agents"] == {} and events[1]["snapshot"]["relay"]["seq"] == 0


async def test_bad_input_is_refused_with_a_clear_error(start_gateway: Any) -> None:
    gw = start_gateway({"RELAY_LIMITS_MAX_BODY_BYTES": "2048"})
    rid = str(uuid.uuid4())
    async with httpx.AsyncClient(timeout=10) as client:
        plain = await client.post(
            url(gw, rid), content=b"{}", headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415
        broken = await client.post(
            url(gw, rid), content=b"{", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 400 and broken.json()["code"] == "invalid_json"
        missing = await client.post(url(gw, rid), json={"threadId": "t", "messages": []})
        assert missing.status_code == 400 and "runId" in missing.json()["message"]
        answer = {"interruptId": "p", "status": "resolved", "payload": {"yes": 1}}
        bad = await client.post(url(gw, rid), json=run_body("r", resume=[answer]))
        assert bad.status_code == 400 and "decision" in bad.json()["message"]
        props = {"relay": {"after_seq": "x"}}
        cursor = await client.post(url(gw, rid), json=run_body("r", forwardedProps=props))
        assert cursor.status_code == 400 and "after_seq" in cursor.json()["message"]
        big = await client.post(url(gw, rid), json=run_body("r", state={"pad": "x" * 4096}))
        assert big.status_code == 413
        not_uuid = await client.post(f"{gw.http}/agui/requests/nope", json=run_body("r"))
        assert not_uuid.status_code == 400 and not_uuid.json()["code"] == "invalid_uuid"


async def test_streams_count_against_the_connection_limits(start_gateway: Any) -> None:
    gw = start_gateway({"RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": "1"})
    rid = str(uuid.uuid4())
    opened = asyncio.Event()

    async def hold() -> None:
        def started(evs: Events) -> bool:
            opened.set()
            return False

        await read_run(url(gw, rid), run_body("a"), stop=started)

    holder = asyncio.create_task(hold())
    try:
        await asyncio.wait_for(opened.wait(), 10)
        status, body = await read_run(url(gw, rid), run_body("b"))
        assert status == 503 and body[0]["code"] == "too_many_connections"
    finally:
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
    # The limit is given back when the stream ends.
    await eventually(
        lambda: gw.get("/readyz")[1].get("watched_requests") == 0, 10, "the stream released"
    )
    status, events = await read_run(url(gw, rid), run_body("c"), stop=lambda evs: len(evs) >= 2)
    assert status == 200 and events[0]["type"] == "RUN_STARTED"


def dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked response (``raw`` starts after the headers)."""
    body, rest = b"", raw
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


async def test_a_stalled_stream_follows_the_bounded_queue_policy_and_loses_nothing(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    gw = start_gateway()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small fixed receive buffer: the gateway's send queue fills, not the kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps(run_body("r1")).encode()
    writer.write(
        f"POST /agui/requests/{rid} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    try:
        await eventually(lambda: gw.get("/readyz")[1]["watched_requests"] == 1, 10, "attached")
        async with RelayClient.from_url(redis_server.url) as pub:
            await pub.publish(rid, spawned_event(root))
            for _ in range(40):
                chunk = [base64.b64encode(os.urandom(750)).decode() for _ in range(100)]
                await pub.publish_text_deltas(rid, root, chunk)
            await eventually(lambda: metric(gw, "relay_queue_drops_total") > 0, 20, "drops")
            await pub.publish(
                rid,
                {
                    "type": "agent_completed",
                    "agent_id": root,
                    "result_summary": "ok",
                    "tokens_used": 1,
                    "duration_ms": 1,
                },
            )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        raw = b""
        async with asyncio.timeout(60):
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(1 << 16)
                assert data, "the stream ended early"
                raw += data
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    events = [
        json.loads(line[6:]) for line in dechunk(rest).split(b"\n") if line.startswith(b"data: ")
    ]
    verify(events)
    assert events[-1]["type"] == "RUN_FINISHED"
    assert contents(events) == texts(history(redis_server.url, rid))


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


async def test_when_history_no_longer_reaches_back_the_run_starts_from_the_snapshot(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    gw = start_gateway()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    short = HistoryConfig(max_events=20)
    async with RelayClient.from_url(redis_server.url, history=short) as pub:
        await pub.publish(rid, spawned_event(root))
        await pub.publish_text_deltas(rid, root, [f"old{i} " for i in range(50)])
        seen: Events = []

        async def follow() -> None:
            start = {"relay": {"after_seq": 0}}
            _, events = await read_run(url(gw, rid), run_body("r1", forwardedProps=start))
            seen.extend(events)

        reader = asyncio.create_task(follow())
        await eventually(lambda: gw.get("/readyz")[1]["watched_requests"] == 1, 10, "attached")
        await pub.publish_text_deltas(rid, root, ["new1 ", "new2"])
        await pub.publish(
            rid,
            {
                "type": "agent_completed",
                "agent_id": root,
                "result_summary": "ok",
                "tokens_used": 1,
                "duration_ms": 1,
            },
        )
        await asyncio.wait_for(reader, 30)
    verify(seen)
    snapshot = seen[1]["snapshot"]
    assert snapshot["relay"]["seq"] == 51 and snapshot["agents"][root]["status"] == "running"
    assert {"type": "CUSTOM", "name": "relay.history_trimmed", "value": {"from_seq": 51}} in seen
    # What history lost is lost, unless the snapshot carries the text so far.
    assert contents(seen)[f"msg-{root}"].endswith("new1 new2")
    assert seen[-1]["type"] == "RUN_FINISHED"


async def test_a_quiet_stream_carries_heartbeat_comments(start_gateway: Any) -> None:
    gw = start_gateway({"RELAY_GATEWAY_PING_INTERVAL": "0.2"})
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", url(gw, str(uuid.uuid4())), json=run_body("r")) as resp,
    ):
        async with asyncio.timeout(10):
            async for line in resp.aiter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break
    assert lines[-1] == ": keep-alive"
    assert resp.headers["cache-control"].startswith("no-cache")


async def follow(target: str, *, first: str = "r0", limit: int = 50) -> Events:
    """Runs on one client until the request's run ends, resuming after every break."""
    seen: Events = []
    state: Any = None
    for n in range(limit):
        body = run_body(f"{first}-{n}")
        if state is not None:
            body.update(state=state, messages=client_messages(seen))
        try:
            status, events = await read_run(target, body)
        except httpx.HTTPError:
            await asyncio.sleep(0.2)  # the gateway is away: try again
            continue
        if status != 200:
            await asyncio.sleep(0.2)
            continue
        verify(events)
        state = apply(state, events)
        seen += events
        if events and events[-1]["type"] == "RUN_FINISHED":
            return seen
    raise AssertionError(f"no RUN_FINISHED after {limit} runs")


async def test_a_stream_goes_on_across_a_redis_restart(tmp_path: Path, start_gateway: Any) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        gw = start_gateway(redis_url=server.url)
        rid, root = str(uuid.uuid4()), str(uuid.uuid4())
        reader = asyncio.create_task(follow(url(gw, rid)))
        await eventually(lambda: gw.get("/readyz")[1]["watched_requests"] == 1, 10, "attached")
        async with RelayClient.from_url(server.url, publish_retry_seconds=30) as pub:
            await pub.publish(rid, spawned_event(root))
            await pub.publish_text_deltas(rid, root, [f"before{i} " for i in range(20)])
            await asyncio.to_thread(server.restart, 0.5)
            await pub.publish_text_deltas(rid, root, [f"after{i} " for i in range(20)])
            await pub.publish(
                rid,
                {
                    "type": "agent_completed",
                    "agent_id": root,
                    "result_summary": "ok",
                    "tokens_used": 1,
                    "duration_ms": 1,
                },
            )
        seen = await asyncio.wait_for(reader, 60)
        expected = "".join(f"before{i} " for i in range(20)) + "".join(
            f"after{i} " for i in range(20)
        )
        assert contents(seen) == {f"msg-{root}": expected}
    finally:
        server.stop()


async def test_a_stream_ends_when_its_token_expires(start_gateway: Any) -> None:
    gw = start_gateway({**jwt_env(), "RELAY_AUTH_LEEWAY_SECONDS": "0"})
    short = mint_token(SECRET, tenant="default", caps=("view",), sub="ops", ttl_seconds=2)
    status, events = await read_run(
        url(gw, str(uuid.uuid4())), run_body("r"), headers={"Authorization": f"Bearer {short}"}
    )
    assert status == 200
    verify(events)
    assert events[-1] == {
        "type": "RUN_ERROR",
        "message": "token expired",
        "code": "relay.token_expired",
    }
