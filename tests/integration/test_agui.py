"""``POST /agui/requests/{id}`` against real redis-server and gateway processes.

The AG-UI stream of simulated runs: verified run by run (the official
models and the client's rules, tests/agui_checks.py), compared with
what Redis holds, cut and resumed, paused and answered, and refused the way
the WebSocket refuses.
"""

from __future__ import annotations

import asyncio
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
from tests.agui_checks import apply, client_messages, verify
from tests.integration.agui_support import (
    PAUSING,
    QUIET,
    SECRET,
    Events,
    bearer,
    contents,
    history,
    jwt_env,
    read_run,
    run_body,
    simulations,
    spawned_event,
    texts,
    url,
)
from tests.support import RedisServer, RelayProcess, eventually

pytestmark = pytest.mark.integration

SHORT = ("--agents", "3", "--depth", "2", "--deltas", "8", "--delta-interval", "0.005")
MEDIUM = ("--agents", "3", "--depth", "2", "--deltas", "30", "--delta-interval", "0.02")


async def finished(proc: RelayProcess, timeout: float = 60) -> None:
    await eventually(lambda: not proc.alive(), timeout, "simulate to exit")
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def sim(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """``sim(rid, *args)`` starts a simulated orchestrator; all are stopped at the end."""
    yield from simulations(redis_server.url, tmp_path)


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
