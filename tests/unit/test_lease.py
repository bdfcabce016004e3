"""Orchestrator leases and the gateway's reaper, on an in-memory Redis running the real scripts.

Time never decides a test here: a lease "expires" because the test moves its
deadline into the past (what the Redis clock would do), so every outcome is
deterministic. Real expiry, with real processes and signals, is tested in
tests/integration/test_lease_processes.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import pytest
from redis.exceptions import ResponseError

from relay.config import ConfigError, GlobalConfig, LeaseConfig, load_config
from relay.gateway.metrics import Metrics
from relay.gateway.reaper import Claim, Reaper
from relay.orchestrator.budget import answer_budget
from relay.orchestrator.client import OrchestratorLost, PublishError, RelayClient
from relay.orchestrator.lease import LeaseKeeper
from relay.wire.keys import Keys
from relay.wire.scripts import script
from tests.support import eventually

FakeRedis: TypeAlias = Any

TENANT = "default"


def spawned(agent: str, parent: str | None, depth: int = 0) -> dict[str, object]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
            "task_description": "t", "depth": depth, "index": 0, "total": 1}  # fmt: skip


@pytest.fixture
async def orchestrator(fake_redis: FakeRedis) -> AsyncIterator[RelayClient]:
    """A client owning a lease (renewals far apart: the tests drive time themselves)."""
    config = LeaseConfig(renew_interval=60, ttl_seconds=120)
    client = RelayClient(fake_redis, owns_connection=False, lease=config)
    async with client:
        yield client


def reaper(redis: FakeRedis, **lease: Any) -> Reaper:
    config = GlobalConfig.model_validate({"lease": lease})
    return Reaper(config, redis, Metrics())


def lease_of(client: RelayClient) -> LeaseKeeper:
    assert client.lease is not None
    return client.lease


async def expire(redis: FakeRedis, keeper: LeaseKeeper) -> None:
    """Move the orchestrator's deadline into the past, as if it stopped renewing."""
    await redis.zadd(keeper.keys.leases, {keeper.orchestrator_id: 1})


async def history(redis: FakeRedis, rid: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(Keys(TENANT).request(rid).history)
    return [json.loads(fields[b"f"]) for _, fields in entries]


async def tree(client: RelayClient) -> tuple[str, str, str, str]:
    """A held request with a root and two children, all running."""
    rid, root, a, b = (str(uuid.uuid4()) for _ in range(4))
    await lease_of(client).hold(rid)
    await client.publish_many(rid, [spawned(root, None), spawned(a, root, 1), spawned(b, root, 1)])
    return rid, root, a, b


# ------------------------------------------------------------------ renewal


async def test_one_renewal_round_trip_covers_every_held_request(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    keeper = lease_of(orchestrator)
    rids = [str(uuid.uuid4()) for _ in range(25)]
    for rid in rids:
        await keeper.hold(rid)
    sent: list[tuple[Any, ...]] = []
    real = fake_redis.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(args)
        return await real(*args, **kwargs)

    fake_redis.execute_command = counting
    await expire(fake_redis, keeper)
    sent.clear()
    await keeper.renew()
    fake_redis.execute_command = real
    assert len(sent) == 1 and sent[0][0] == "EVALSHA", sent
    # The renewed deadline is in the future for all 25 requests: nothing is due.
    assert await reaper(fake_redis).reap_once() == 0
    members = await fake_redis.smembers(Keys(TENANT).orchestrator_requests(keeper.orchestrator_id))
    assert {m.decode() for m in members} == set(rids)


async def test_the_background_task_renews_the_lease(fake_redis: FakeRedis) -> None:
    keeper = LeaseKeeper(fake_redis, Keys(TENANT), LeaseConfig(renew_interval=0.01, ttl_seconds=60))
    async with keeper:
        await keeper.hold(str(uuid.uuid4()))
        start = keeper.renewals
        await expire(fake_redis, keeper)
        await eventually(lambda: keeper.renewals >= start + 3, 10, "three background renewals")
        score = await fake_redis.zscore(keeper.keys.leases, keeper.orchestrator_id)
        assert score is not None and score > 1
    # Closing releases what it held and drops the lease: nobody will reap it.
    assert await fake_redis.zscore(keeper.keys.leases, keeper.orchestrator_id) is None
    assert await reaper(fake_redis).reap_once() == 0


async def test_a_renewal_that_lands_before_the_scan_keeps_the_orchestrator(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    """A long pause that ends before a gateway looks: the renewal wins, nothing is declared."""
    rid, *_ = await tree(orchestrator)
    keeper = lease_of(orchestrator)
    await expire(fake_redis, keeper)
    await keeper.renew()
    gateway = reaper(fake_redis)
    assert await gateway.reap_once() == 0
    assert gateway.metrics.orchestrators_lost._value.get() == 0
    assert not keeper.lost
    await orchestrator.publish(rid, {"type": "synthesis_started", "request_id": rid})


async def test_the_lease_settings_are_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"lease.*ttl_seconds \(1\) must be at least twice"):
        load_config(environ={"RELAY_LEASE_TTL_SECONDS": "1", "RELAY_LEASE_RENEW_INTERVAL": "1"})
    with pytest.raises(ConfigError, match=r"lease.reaper_redis_url: .*redis://"):
        load_config(environ={"RELAY_LEASE_REAPER_REDIS_URL": "http://x"})
    assert load_config(environ={}).lease.ttl_seconds == 5.0


# ------------------------------------------------------------------ loss


async def test_an_expired_lease_finishes_the_request_for_everyone(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid, root, a, b = await tree(orchestrator)
    await orchestrator.publish(rid, {"type": "agent_completed", "agent_id": b,
                                     "result_summary": "done", "tokens_used": 1,
                                     "duration_ms": 1})  # fmt: skip
    await expire(fake_redis, lease_of(orchestrator))
    gateway = reaper(fake_redis)
    assert await gateway.reap_once() == 1
    frames = await history(fake_redis, rid)
    failed = [f for f in frames if f["type"] == "agent_failed"]
    # The running agents only (b had completed), the child before the root.
    assert [f["agent_id"] for f in failed] == [a, root]
    assert all(f["will_retry"] is False and "orchestrator lost" in f["error"] for f in failed)
    state = await fake_redis.hgetall(Keys(TENANT).request(rid).state)
    outcome = json.loads(state[b"outcome"])
    assert outcome["status"] == "failed" and outcome["agent_id"] == root
    assert outcome["reason"] == "orchestrator_lost"
    assert outcome["orchestrator"] == lease_of(orchestrator).orchestrator_id
    assert gateway.metrics.requests_lost._value.get() == 1
    assert gateway.metrics.orchestrators_lost._value.get() == 1
    # Done: the orchestrator left the index, a second scan finds nothing.
    assert await gateway.reap_once() == 0
    assert (
        await fake_redis.zscore(Keys(TENANT).leases, lease_of(orchestrator).orchestrator_id) is None
    )


async def test_a_request_without_agents_gets_a_lost_outcome(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid = str(uuid.uuid4())
    await lease_of(orchestrator).hold(rid)
    await expire(fake_redis, lease_of(orchestrator))
    assert await reaper(fake_redis).reap_once() == 1
    assert await history(fake_redis, rid) == []
    raw = await fake_redis.hget(Keys(TENANT).request(rid).state, "outcome")
    outcome = json.loads(raw)
    assert (outcome["status"], outcome["reason"]) == ("failed", "orchestrator_lost")


async def test_a_released_request_is_not_touched(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid, *_ = await tree(orchestrator)
    await lease_of(orchestrator).release(rid)
    await expire(fake_redis, lease_of(orchestrator))
    assert await reaper(fake_redis).reap_once() == 0
    assert all(f["type"] == "agent_spawned" for f in await history(fake_redis, rid))


async def test_two_reapers_racing_for_a_request_publish_once(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    """Both gateways saw the orchestrator due and the request among its requests:
    the claim lets exactly one of them publish."""
    rid, root, a, b = await tree(orchestrator)
    keeper = lease_of(orchestrator)
    await expire(fake_redis, keeper)
    first, second = reaper(fake_redis), reaper(fake_redis)
    client = RelayClient(fake_redis, owns_connection=False)
    due = await script("lease_due")(fake_redis, [client.keys.leases, client.keys.leases_lost],
                                    [10, 1000])  # fmt: skip
    assert [x.decode() if isinstance(x, bytes) else x for x in due[1:]] == [
        keeper.orchestrator_id, 1]  # fmt: skip
    # The first gateway claims and is held up just before it publishes; the
    # second reaches the same request meanwhile: it must not publish too.
    reached, go = asyncio.Event(), asyncio.Event()

    class HeldUp(RelayClient):
        async def publish_once(self, *args: Any, **kwargs: Any) -> Any:
            reached.set()
            await go.wait()
            return await super().publish_once(*args, **kwargs)

    held_up = HeldUp(fake_redis, owns_connection=False)
    winner = asyncio.create_task(first._finish(held_up, keeper.orchestrator_id, rid))
    await asyncio.wait_for(reached.wait(), 5)
    meanwhile = await second._finish(client, keeper.orchestrator_id, rid)
    go.set()
    claims = [await winner, meanwhile, await second._finish(client, keeper.orchestrator_id, rid)]
    failed = [f for f in await history(fake_redis, rid) if f["type"] == "agent_failed"]
    assert sorted(f["agent_id"] for f in failed) == sorted([root, a, b])  # once each
    assert claims == [Claim.WON, Claim.BUSY, Claim.NOTHING]
    # And concurrently, through whole scans, on a fresh request.
    slow = LeaseConfig(renew_interval=60, ttl_seconds=120)
    other = RelayClient(fake_redis, owns_connection=False, lease=slow)
    async with other:
        rid2, *agents = await tree(other)
        await expire(fake_redis, lease_of(other))
        scans = await asyncio.gather(*(r.reap_once() for r in (first, second, reaper(fake_redis))))
    assert sum(scans) == 1
    failed = [f for f in await history(fake_redis, rid2) if f["type"] == "agent_failed"]
    assert sorted(f["agent_id"] for f in failed) == sorted(agents)


async def test_a_claim_left_unfinished_is_taken_over_publishing_once(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    """A gateway that died between claim and publish, and one that was only slow:
    after the takeover time the next gateway completes the request, publishing once."""
    keeper = lease_of(orchestrator)
    client = RelayClient(fake_redis, owns_connection=False)
    lost_keys = [client.keys.leases, client.keys.leases_lost]
    rid, root, a, b = await tree(orchestrator)
    await expire(fake_redis, keeper)
    await script("lease_due")(fake_redis, lost_keys, [10, 1000])
    rk = client.keys.request(rid)
    fence = script("lease_fence")
    claim = await fence(fake_redis, [rk.lease, rk.state, rk.pending],
                        [keeper.orchestrator_id, 30_000, "dead-gateway"])  # fmt: skip
    assert int(claim[0]) == 1
    gateway = reaper(fake_redis)
    assert await gateway.reap_once() == 0  # the claim is fresh: not taken over yet
    await fake_redis.hset(rk.lease, "claim_ts", 0)  # ... until takeover_seconds passed
    assert await gateway.reap_once() == 1
    failed = [f for f in await history(fake_redis, rid) if f["type"] == "agent_failed"]
    assert sorted(f["agent_id"] for f in failed) == sorted([root, a, b])

    # Not dead, only slow: its publish lands after the takeover read the state
    # (all agents still running) and before the takeover publishes. The same
    # publish id makes the takeover's publish a no-op.
    second = RelayClient(fake_redis, owns_connection=False, lease=LeaseConfig())
    async with second:
        other = lease_of(second)
        rid2, *agents = await tree(second)
        await expire(fake_redis, other)
        await script("lease_due")(fake_redis, lost_keys, [10, 1000])
        rk2 = client.keys.request(rid2)
        await fence(fake_redis, [rk2.lease, rk2.state, rk2.pending],
                    [other.orchestrator_id, 30_000, "slow-gateway"])  # fmt: skip
        await fake_redis.hset(rk2.lease, "claim_ts", 0)
        reached, go = asyncio.Event(), asyncio.Event()

        class HeldUp(RelayClient):
            async def publish_once(self, *args: Any, **kwargs: Any) -> Any:
                reached.set()
                await go.wait()
                return await super().publish_once(*args, **kwargs)

        held_up = HeldUp(fake_redis, owns_connection=False)
        takeover = asyncio.create_task(gateway._finish(held_up, other.orchestrator_id, rid2))
        await asyncio.wait_for(reached.wait(), 5)
        await client.publish_once(
            rid2,
            [{"type": "agent_failed", "agent_id": x, "error": "orchestrator lost",
              "will_retry": False} for x in agents],
            publish_id=f"lease-lost-{other.orchestrator_id}",
            window_seconds=0,
        )  # fmt: skip
        go.set()
        assert await takeover is Claim.WON
    failed = [f for f in await history(fake_redis, rid2) if f["type"] == "agent_failed"]
    assert len(failed) == 3, failed


# ------------------------------------------------------------------ refusal


async def test_a_lost_orchestrator_that_comes_back_is_refused(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    """Frozen past its deadline, it publishes before its next renewal would tell it:
    the publish script refuses, naming the problem; nothing reaches the stream."""
    rid, root, *_ = await tree(orchestrator)
    keeper = lease_of(orchestrator)
    await expire(fake_redis, keeper)
    assert await reaper(fake_redis).reap_once() == 1
    before = await history(fake_redis, rid)
    assert not keeper.lost  # it has not renewed since
    with pytest.raises(
        OrchestratorLost, match=r"orchestrator lost: request .* was finished"
    ) as info:
        await orchestrator.publish_text_deltas(rid, root, ["still here"])
    assert keeper.orchestrator_id in str(info.value)
    assert isinstance(info.value, PublishError)
    assert await history(fake_redis, rid) == before
    # Now it knows: every later call is refused without a round trip.
    assert keeper.lost
    with pytest.raises(OrchestratorLost):
        await orchestrator.publish(rid, {"type": "synthesis_started", "request_id": rid})
    with pytest.raises(OrchestratorLost):
        await keeper.hold(str(uuid.uuid4()))
    assert isinstance(await asyncio.wait_for(keeper.wait_lost(), 1), OrchestratorLost)


async def test_a_lost_orchestrators_renewal_is_refused(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    keeper = lease_of(orchestrator)
    await tree(orchestrator)
    await expire(fake_redis, keeper)
    await reaper(fake_redis).reap_once()
    with pytest.raises(
        OrchestratorLost, match=f"orchestrator {keeper.orchestrator_id} was declared"
    ):
        await keeper.renew()
    assert keeper.lost


async def test_a_lost_request_cannot_be_held_or_published_by_another_orchestrator(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid, root, *_ = await tree(orchestrator)
    await expire(fake_redis, lease_of(orchestrator))
    await reaper(fake_redis).reap_once()
    other = RelayClient(fake_redis, owns_connection=False, lease=LeaseConfig())
    async with other:
        with pytest.raises(OrchestratorLost, match="cannot be held again"):
            await lease_of(other).hold(rid)
        with pytest.raises(OrchestratorLost, match="was finished by a gateway"):
            await other.publish_text_deltas(rid, root, ["x"])
        # Refused for this request only: the other orchestrator is not lost.
        assert not lease_of(other).lost
        fresh = str(uuid.uuid4())
        await lease_of(other).hold(fresh)
        await other.publish(fresh, {"type": "synthesis_started", "request_id": fresh})


# ------------------------------------------------------------------ budget pause


async def open_pause(fake_redis: FakeRedis, rid: str) -> str:
    """A pause the orchestrator opened (and announced) before it died."""
    pause_id = uuid.uuid4().hex
    rk = Keys(TENANT).request(rid)
    pause = {"pause_id": pause_id, "tokens_used": 9_000, "budget_total": 10_000,
             "opened_ts": 0, "deadline_ts": 10**13, "timeout_decision": "stop"}  # fmt: skip
    await script("budget_open")(fake_redis, [rk.pending, rk.decision], [json.dumps(pause), 600_000])
    return pause_id


async def test_a_pending_pause_is_closed_and_announced(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid, *_ = await tree(orchestrator)
    pause_id = await open_pause(fake_redis, rid)
    await expire(fake_redis, lease_of(orchestrator))
    assert await reaper(fake_redis).reap_once() == 1
    rk = Keys(TENANT).request(rid)
    assert await fake_redis.get(rk.pending) is None
    assert await fake_redis.hget(rk.decided, pause_id) == b"timeout:stop"
    frames = await history(fake_redis, rid)
    decisions = [f for f in frames if f["type"] == "budget_decision"]
    assert [(d["decision"], d["decided_by"]) for d in decisions] == [("stop", "timeout")]
    assert frames.index(decisions[0]) < min(
        i for i, f in enumerate(frames) if f["type"] == "agent_failed"
    )


async def test_a_decision_recorded_while_the_orchestrator_is_down_is_kept(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    rid, *_ = await tree(orchestrator)
    pause_id = await open_pause(fake_redis, rid)
    await answer_budget(fake_redis, Keys(TENANT), rid, "continue", pause_id)
    await expire(fake_redis, lease_of(orchestrator))
    assert await reaper(fake_redis).reap_once() == 1
    rk = Keys(TENANT).request(rid)
    assert await fake_redis.hget(rk.decided, pause_id) == b"client:continue"
    frames = await history(fake_redis, rid)
    assert not [f for f in frames if f["type"] == "budget_decision"]  # nothing overrode it


async def test_an_answer_racing_the_reaper_is_what_the_decision_says(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    """The client answers after the claim read the pending pause but before it closes:
    budget_timeout.lua keeps the client's answer, and the event reports it."""
    rid, *_ = await tree(orchestrator)
    pause_id = await open_pause(fake_redis, rid)
    gateway = reaper(fake_redis)
    client = gateway._clients[TENANT]
    pending = (await fake_redis.get(client.keys.request(rid).pending)).decode()
    await answer_budget(fake_redis, Keys(TENANT), rid, "continue", pause_id)
    (decision,) = await gateway._close_pause(client, rid, pending)
    assert (decision.decision, decision.decided_by) == ("continue", "client")


async def test_a_reaper_without_permissions_says_what_to_configure(
    fake_redis: FakeRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running as a gateway's ACL user, Redis refuses the reaper's scripts: the log
    names the fix, once, and the reaper keeps its task (and its gateway) alive."""
    gateway = reaper(fake_redis, reap_interval=0.01)
    calls: list[int] = []

    async def refused() -> int:
        calls.append(1)
        raise ResponseError(
            "The user executing the script can't run this command or subcommand script: x"
        )

    monkeypatch.setattr(gateway, "reap_once", refused)
    await gateway.start()
    try:
        await eventually(lambda: len(calls) >= 3, 10, "three scans")
    finally:
        await gateway.close()
    hints = [r for r in caplog.records if "lease.reaper_redis_url" in r.getMessage()]
    assert len(hints) == 1, [r.getMessage() for r in caplog.records]


async def test_every_request_of_a_lost_orchestrator_is_finished_in_one_scan(
    fake_redis: FakeRedis, orchestrator: RelayClient
) -> None:
    trees = [await tree(orchestrator) for _ in range(40)]
    await expire(fake_redis, lease_of(orchestrator))
    assert await reaper(fake_redis).reap_once() == 40
    for rid, *agents in trees:
        failed = [
            f["agent_id"] for f in await history(fake_redis, rid) if f["type"] == "agent_failed"
        ]
        assert sorted(failed) == sorted(agents)


async def test_a_publish_that_fails_gives_the_claim_up_for_the_next_scan(
    fake_redis: FakeRedis, orchestrator: RelayClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refused the terminal events (say, out of memory): the next scan retries
    at once instead of waiting for the takeover time."""
    rid, *agents = await tree(orchestrator)
    await expire(fake_redis, lease_of(orchestrator))
    gateway = reaper(fake_redis)
    client = gateway._clients[TENANT]
    real = client.publish_once

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise PublishError("publish refused by Redis: OOM")

    monkeypatch.setattr(client, "publish_once", refused)
    with pytest.raises(PublishError, match="OOM"):
        await gateway.reap_once()
    monkeypatch.setattr(client, "publish_once", real)
    assert await gateway.reap_once() == 1
    failed = [f["agent_id"] for f in await history(fake_redis, rid) if f["type"] == "agent_failed"]
    assert sorted(failed) == sorted(agents)
