"""Orchestrator liveness with real processes: SIGKILL, short and long SIGSTOP.

A real redis-server, two gateway processes (each with its reaper), viewers
on both, and an orchestrator process (``lease_worker.py``) that holds one
request under a lease renewed every 0.25 s with a 2 s TTL.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.lease_support import (
    BOUND,
    LEASE_ENV,
    TTL,
    LeaseWorker,
    failed_agents,
    kill_and_measure,
    open_viewers,
    until_all,
    viewer_urls,
)
from tests.support import Gateway, RedisServer, metric, start_gateways

StartGateway = Callable[..., Gateway]


@pytest.fixture
def two_gateways(
    tmp_path: Path, redis_server: RedisServer, gateways: list[Gateway]
) -> list[Gateway]:
    pair = [Gateway(redis_server.url, tmp_path / f"gw-{i}.log", LEASE_ENV) for i in range(2)]
    gateways.extend(pair)
    start_gateways(pair)
    return pair


async def test_a_killed_orchestrator_is_finished_at_every_viewer_once_within_the_bound(
    redis_server: RedisServer, two_gateways: list[Gateway], tmp_path: Path
) -> None:
    delays = await kill_and_measure(redis_server.url, two_gateways, tmp_path)
    assert max(delays) < BOUND, delays
    # Exactly one of the two gateways claimed the request.
    lost = [metric(gw, "relay_requests_lost_total") for gw in two_gateways]
    assert sorted(lost) == [0, 1], lost
    print(f"SIGKILL -> terminal events at 4 viewers: {[round(d, 3) for d in delays]} s")


async def test_a_short_stop_declares_nothing_and_the_run_completes(
    redis_server: RedisServer, two_gateways: list[Gateway], tmp_path: Path
) -> None:
    """Frozen for well under the TTL (a GC pause), it renews on waking: not lost."""
    rid = str(uuid.uuid4())
    # Runs for twice the TTL: without renewals it would be declared lost anyway.
    worker = LeaseWorker(redis_server.url, rid, 2 * TTL, tmp_path / "worker.log")
    viewers = await open_viewers(viewer_urls(two_gateways, rid))
    try:
        await worker.start()
        await worker.expect("held")
        await until_all(viewers, lambda v: len(v.events(rid)) >= 6, 20, "the run under way")
        worker.signal(signal.SIGSTOP)
        await asyncio.sleep(TTL / 4)
        worker.signal(signal.SIGCONT)
        assert await worker.wait(30) == 0, worker.messages
        done = worker.message("done")
        assert done is not None and done["renewals"] >= 4, worker.messages
        await until_all(
            viewers,
            lambda v: sum(f["type"] == "agent_completed" for f in v.events(rid)) == 3,
            10,
            "agent_completed x3",
        )
        for viewer in viewers:
            assert failed_agents(viewer, rid) == []
    finally:
        await worker.stop()
        for viewer in viewers:
            await viewer.close()
    assert [metric(gw, "relay_requests_lost_total") for gw in two_gateways] == [0, 0]
    assert [metric(gw, "relay_orchestrators_lost_total") for gw in two_gateways] == [0, 0]


async def test_a_long_stop_is_declared_and_the_next_publish_is_refused(
    redis_server: RedisServer, two_gateways: list[Gateway], tmp_path: Path
) -> None:
    """Frozen past the TTL (a partition): declared lost, finished for the viewers; on
    waking its next publish raises OrchestratorLost and nothing reaches the stream."""
    rid = str(uuid.uuid4())
    worker = LeaseWorker(redis_server.url, rid, 60, tmp_path / "worker.log")
    viewers = await open_viewers(viewer_urls(two_gateways, rid))
    try:
        await worker.start()
        held = await worker.expect("held")
        await until_all(viewers, lambda v: len(v.events(rid)) >= 6, 20, "the run under way")
        worker.signal(signal.SIGSTOP)
        await until_all(
            viewers,
            lambda v: set(failed_agents(v, rid)) == set(held["agents"]),
            BOUND + 5,
            "agent_failed at every viewer",
        )
        last = [len(v.events(rid)) for v in viewers]
        worker.signal(signal.SIGCONT)
        assert await worker.wait(30) == 3, worker.messages
        lost = worker.message("lost")
        assert lost is not None, worker.messages
        assert "orchestrator lost" in lost["message"], lost
        assert held["orchestrator"] in lost["message"], lost
        await asyncio.sleep(0.5)
        assert [len(v.events(rid)) for v in viewers] == last  # not resurrected
    finally:
        await worker.stop()
        for viewer in viewers:
            await viewer.close()


async def test_a_budget_decision_made_while_the_orchestrator_is_stopped_is_kept(
    redis_server: RedisServer, two_gateways: list[Gateway], tmp_path: Path
) -> None:
    """The orchestrator waits in a budget pause, is frozen, a viewer answers "continue"
    meanwhile; on waking (before the TTL) it reads that answer and carries on."""
    rid = str(uuid.uuid4())
    worker = LeaseWorker(redis_server.url, rid, 0.5, tmp_path / "worker.log", pause=True)
    viewers = await open_viewers(viewer_urls(two_gateways, rid))
    try:
        await worker.start()
        await worker.expect("paused")
        await until_all(
            viewers, lambda v: bool(v.of_type("budget_warning")), 20, "the budget warning"
        )
        worker.signal(signal.SIGSTOP)
        ack = await viewers[-1].request({"type": "budget_continue", "request_id": rid}, "ack")
        assert ack["type"] == "ack", ack
        worker.signal(signal.SIGCONT)
        decided = await worker.expect("decided")
        assert (decided["decision"], decided["by"]) == ("continue", "client")
        assert await worker.wait(30) == 0, worker.messages
        await until_all(
            viewers,
            lambda v: any(f["type"] == "budget_decision" for f in v.events(rid)),
            10,
            "budget_decision",
        )
    finally:
        await worker.stop()
        for viewer in viewers:
            await viewer.close()
    assert [metric(gw, "relay_requests_lost_total") for gw in two_gateways] == [0, 0]
