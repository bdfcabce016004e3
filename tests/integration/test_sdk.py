"""The orchestrator SDK against real processes: redis-server, gateways, other orchestrators.

* a subtree cancel sent by a WebSocket client interrupts agents blocked in an ``await``;
* a tree whose root runs in one orchestrator process and whose children run
  in another is cancelled from the root's process;
* 10,000 single-token deltas arrive in order in far fewer script calls than deltas;
* unbatched agents side by side share round trips, each agent's deltas in order;
* a budget pause answered over the WebSocket resumes the agent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import relay
from tests.integration.test_claims_lineage import Worker
from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
# Cancel -> agents interrupted and announced, on loopback (measured: milliseconds).
BOUND = 2.0


def sdk_config(redis_url: str, **sdk: Any) -> relay.GlobalConfig:
    return relay.GlobalConfig(
        redis=relay.RedisConfig(url=redis_url),
        # Tombstone polls far apart: within BOUND only the nudge can reach an agent.
        cancel=relay.CancelConfig(poll_interval=60.0),
        sdk=relay.SdkConfig(**sdk),
    )


async def watch(gw: Gateway, rid: str) -> WsClient:
    viewer = WsClient(gw.ws_url)
    await viewer.__aenter__()
    reply = await viewer.request({"type": "subscribe", "request_id": rid}, "subscribed")
    assert reply["type"] == "subscribed", reply
    return viewer


def ended(viewer: WsClient, rid: str, kind: str) -> list[str]:
    return [f["agent_id"] for f in viewer.events(rid) if f["type"] == kind]


async def test_a_subtree_cancel_from_a_websocket_client_interrupts_an_agent_blocked_in_an_await(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    interrupted: dict[str, float] = {}
    viewer = await watch(gw, rid)
    try:
        async with relay.connect(sdk_config(redis_server.url)) as rc, rc.request(rid) as req:
            async with req.agent("Root") as root:
                ready: set[str] = set()

                async def blocked(agent: relay.Agent) -> None:
                    ready.add(agent.id)
                    try:
                        await asyncio.Event().wait()  # a model call that never answers
                    except asyncio.CancelledError:
                        interrupted[agent.id] = time.monotonic()
                        raise

                async def branch(task: str) -> None:
                    async with root.child(task) as child:
                        async with child.child(f"{task}, step 1") as grand:
                            await blocked(grand)
                        await blocked(child)

                async with asyncio.TaskGroup() as group:
                    group.create_task(branch("Cancelled branch"))
                    group.create_task(branch("Other branch"))
                    await eventually(lambda: len(ready) == 2, 10, "both grandchildren waiting")
                    target, other = (
                        next(a for a in req.agents.values() if a.task == name)
                        for name in ("Cancelled branch", "Other branch")
                    )
                    await viewer.wait_for(lambda c: target.id in ended(c, rid, "agent_spawned"), 10)
                    sent = time.monotonic()
                    ack = await viewer.request(
                        {"type": "cancel_agent", "agent_id": target.id}, "ack"
                    )
                    assert ack["type"] == "ack", ack
                    await viewer.wait_for(
                        lambda c: target.id in ended(c, rid, "agent_cancelled"), BOUND
                    )
                    latency = time.monotonic() - sent
                    subtree = {a.id for a in req.agents.values() if target.id in a.lineage}
                    assert len(subtree) == 2 and set(interrupted) == subtree - {target.id}
                    # The other branch is untouched and still blocked.
                    assert all(a.outcome is None for a in req.agents.values() if a.depth and
                               other.id in a.lineage)  # fmt: skip
                    await rc.cancel(other.id, reason="test over")
            assert root.outcome == "completed", "the root goes on after its children's cancels"
        cancelled = ended(viewer, rid, "agent_cancelled")
        subtree_order = [a for a in cancelled if a in subtree]
        assert subtree_order == sorted(subtree, key=lambda a: -req.agents[a].depth)
        reasons = [f["reason"] for f in viewer.events(rid) if f["type"] == "agent_cancelled"]
        assert reasons[: len(subtree)] == ["cancelled by user"] * len(subtree)
        assert latency < BOUND, f"cancel to agent_cancelled at the viewer: {latency:.3f}s"
    finally:
        await viewer.close()


async def test_a_cross_host_tree_is_cancelled_from_the_root(
    tmp_path: Path, redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid, root, kid1, kid2, grand = (str(uuid.uuid4()) for _ in range(5))
    viewer = await watch(gw, rid)
    try:
        async with (
            Worker(redis_server.url, tmp_path / "host-a.log") as a,
            Worker(redis_server.url, tmp_path / "host-b.log") as b,
        ):
            assert await a.register(root, [rid]) is False  # the root agent on host A
            assert await b.register(kid1, [rid, root]) is False  # its children on host B
            assert await b.register(kid2, [rid, root]) is False
            assert await b.register(grand, [rid, root, kid1]) is False
            await viewer.wait_for(lambda c: len(ended(c, rid, "agent_spawned")) == 4)

            sent = time.monotonic()
            await a._call({"op": "cancel", "id": root}, "cancel_sent")  # from the root's host
            await eventually(
                lambda: root in a.cancelled and {kid1, kid2, grand} <= set(b.cancelled),
                BOUND * 2,
                "every agent of the tree cancelled",
            )
            latency = max([a.cancelled[root], *(b.cancelled[k] for k in (kid1, kid2, grand))])
            assert latency - sent < BOUND
            reports = [m for m in a.messages + b.messages if m["event"] == "cancelled"]
            assert {m["id"] for m in reports} == {root, kid1, kid2, grand}
            assert all(m["interrupted"] and m["by"] == root for m in reports), reports
            await viewer.wait_for(lambda c: len(ended(c, rid, "agent_cancelled")) == 4, BOUND)
        cancelled = ended(viewer, rid, "agent_cancelled")
        assert sorted(cancelled) == sorted({root, kid1, kid2, grand}), "each exactly once"
    finally:
        await viewer.close()


async def test_ten_thousand_single_token_deltas_arrive_in_order_in_few_round_trips(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    n = 10_000
    viewer = await watch(gw, rid)
    try:
        async with relay.connect(sdk_config(redis_server.url)) as rc:
            redis_server.command("CONFIG", "RESETSTAT")
            async with rc.request(rid, budget=1_000_000) as req, req.agent("Streamer") as agent:
                for i in range(n):
                    await agent.text(f"{i} ", tokens=1)
                    await asyncio.sleep(0)  # an LLM stream yields between tokens
            calls = script_calls(redis_server)
        await viewer.wait_for(lambda c: agent.id in ended(c, rid, "agent_completed"), 30)
    finally:
        await viewer.close()
    texts = [f["text"] for f in viewer.events(rid) if f["type"] == "agent_text_delta"]
    assert texts == [f"{i} " for i in range(n)], "every delta, in order"
    # Script calls: per batch one publish and one budget add, plus spawn and completion.
    assert calls <= n // 20, f"{calls} script calls for {n} deltas"
    updates = [f for f in viewer.events(rid) if f["type"] == "budget_update"]
    assert updates[-1]["tokens_used"] == n


async def test_unbatched_agents_side_by_side_share_round_trips_to_a_real_redis(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    agents, per_agent = 10, 50
    viewer = await watch(gw, rid)
    try:
        async with relay.connect(sdk_config(redis_server.url, batch_max_events=1)) as rc:
            redis_server.command("CONFIG", "RESETSTAT")
            async with rc.request(rid, budget=1_000_000) as req:

                async def stream(i: int) -> str:
                    async with req.agent(f"streamer {i}", index=i, total=agents) as agent:
                        for n in range(per_agent):
                            await agent.text(f"{n},", tokens=1)
                    return agent.id

                ids = await asyncio.gather(*(stream(i) for i in range(agents)))
            calls = script_calls(redis_server)
            trips = rc.client.calls.pipelines
        done = set(ids)
        await viewer.wait_for(lambda c: done <= set(ended(c, rid, "agent_completed")), 30)
    finally:
        await viewer.close()
    # Every delta its own publish and budget add, as Redis counted them ...
    assert calls >= agents * per_agent * 2, calls
    # ... in far fewer round trips, since agents waiting at once share a pipeline.
    assert trips * 4 < calls, (trips, calls)
    for agent_id in ids:
        texts = [
            f["text"]
            for f in viewer.events(rid)
            if f["type"] == "agent_text_delta" and f["agent_id"] == agent_id
        ]
        assert texts == [f"{n}," for n in range(per_agent)], "each agent's deltas, in order"
    seqs = [f["seq"] for f in viewer.events(rid)]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


def script_calls(redis_server: RedisServer) -> int:
    """EVALSHA, EVAL and FCALL calls since the last CONFIG RESETSTAT."""
    total = 0
    for line in redis_server.command("INFO", "commandstats").decode().splitlines():
        name, _, stats = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"):
            total += int(dict(kv.split("=") for kv in stats.split(","))["calls"])
    return total


async def test_a_budget_pause_answered_over_the_websocket_resumes_the_agent(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    viewer = await watch(gw, rid)
    try:
        async with (
            relay.connect(sdk_config(redis_server.url)) as rc,
            rc.request(rid, budget=10_000) as req,
            req.agent("Spender") as agent,
        ):
            await agent.text("expensive ", tokens=8_500)  # past the 80% warning
            await agent.flush()
            resumed = asyncio.create_task(agent.text("resumed", tokens=1))
            await viewer.wait_for(lambda c: bool(c.of_type("budget_warning")), 10)
            await asyncio.sleep(0.05)
            assert not resumed.done(), "the agent waits for the decision"
            ack = await viewer.request({"type": "budget_continue", "request_id": rid}, "ack")
            assert ack["type"] == "ack" and ack["decision"] == "continue", ack
            await asyncio.wait_for(resumed, 10)
        await viewer.wait_for(lambda c: agent.id in ended(c, rid, "agent_completed"), 10)
    finally:
        await viewer.close()
    frames = viewer.events(rid)
    order = [f["type"] for f in frames]
    decision = frames[order.index("budget_decision")]
    assert (decision["decision"], decision["decided_by"]) == ("continue", "client")
    resumed_at = next(i for i, f in enumerate(frames) if f.get("text") == "resumed")
    assert order.index("budget_warning") < order.index("budget_decision") < resumed_at
    assert req.decision is not None and req.halted is None
