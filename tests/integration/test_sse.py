"""``GET /sse/events`` against real gateways: auth and tenancy, HAProxy, kills, restarts.

The client is :class:`tests.sseclient.SseClient`, which reconnects the way a
browser's ``EventSource`` does (after ``retry:``, with ``Last-Event-ID``);
the HAProxy in front runs the repository's ``deploy/haproxy.cfg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.gateway.auth import mint_token
from relay.orchestrator.client import RelayClient
from tests.integration import test_topology
from tests.integration.test_topology import (
    MEDIUM_RUN,
    QUIET,
    HAProxy,
    Topology,
    final_seq,
    wait_exit,
)
from tests.sseclient import SseClient
from tests.support import Gateway, RedisServer, eventually, metric
from tests.unit.test_deploy_files import GATEWAYS, HAPROXY

pytestmark = pytest.mark.integration
topology = test_topology.topology  # the fixture: Redis, three gateways, HAProxy

SECRET = "sse-integration-secret-" + "s" * 32
StartGateway = Callable[..., Gateway]


def sse_url(base: str, rid: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"request_id": rid, **params}.items())
    return f"{base}/sse/events?{query}"


def token(
    tenant: str = "default", caps: tuple[str, ...] = ("view",), requests: tuple[str, ...] = ()
) -> str:
    return mint_token(
        SECRET, tenant=tenant, caps=caps, sub="sse", ttl_seconds=600, requests=requests
    )


async def answer(url: str, **headers: str) -> SseClient:
    """Connect once and return the client after its first answer (200 or a refusal)."""
    client = SseClient(url, headers=headers, reconnect=False).start()
    await eventually(lambda: client.status is not None, 10, "an answer")
    return client


async def test_bad_input_is_400_json_and_resume_is_exact(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    bad = await answer(sse_url(gw.http, rid), **{"Last-Event-ID": "nonsense"})
    assert bad.status == 400 and bad.refusal["code"] == "invalid_last_event_id"
    none = await answer(f"{gw.http}/sse/events")
    assert none.status == 400 and none.refusal["code"] == "invalid_field"

    async with RelayClient.from_url(gw.env["RELAY_REDIS_URL"]) as pub:
        agent = str(uuid.uuid4())
        for i in range(5):
            await pub.publish(rid, {"type": "agent_text_delta", "agent_id": agent, "text": f"{i}"})
        async with SseClient(sse_url(gw.http, rid, after_seq="0"), reconnect=False) as first:
            await eventually(lambda: first.seqs(rid) == [1, 2, 3, 4, 5], 10, "five events")
            assert first.response_headers["x-accel-buffering"] == "no"
            assert first.response_headers["cache-control"] == "no-cache"
            last = first.last_event_id
        for i in range(3):
            await pub.publish(rid, {"type": "agent_text_delta", "agent_id": agent, "text": f"{i}"})
    async with SseClient(sse_url(gw.http, rid, after_seq="0"), last_event_id=last) as second:
        await eventually(lambda: second.seqs(rid) == [6, 7, 8], 10, "the three new events")


@pytest.fixture
def auth_gateway(start_gateway: StartGateway) -> Gateway:
    return start_gateway({"RELAY_AUTH_MODE": "jwt", "RELAY_AUTH_JWT_SECRET": SECRET})


async def test_auth_and_scope_are_refused_before_the_stream(auth_gateway: Gateway) -> None:
    rid, other = str(uuid.uuid4()), str(uuid.uuid4())
    gw = auth_gateway
    missing = await answer(sse_url(gw.http, rid))
    assert missing.status == 401 and missing.refusal["code"] == "unauthorized"
    forged = mint_token("x" * 40, tenant="default", caps=["view"], sub="x", ttl_seconds=60)
    invalid = await answer(sse_url(gw.http, rid, token=forged))
    assert invalid.status == 401 and invalid.refusal["code"] == "invalid_token"
    scoped = await answer(sse_url(gw.http, rid, token=token(requests=(other,))))
    assert scoped.status == 403 and scoped.refusal["code"] == "forbidden"
    blind = await answer(sse_url(gw.http, rid, token=token(caps=("cancel",))))
    assert blind.status == 403
    by_query = await answer(sse_url(gw.http, rid, token=token(requests=(rid,))))
    by_header = await answer(sse_url(gw.http, rid), Authorization=f"Bearer {token()}")
    assert by_query.status == by_header.status == 200
    await by_query.stop()
    await by_header.stop()


async def test_a_tenant_sees_only_its_own_request(auth_gateway: Gateway) -> None:
    gw = auth_gateway
    rid = str(uuid.uuid4())  # the same id in two tenants: two different streams
    redis_url = gw.env["RELAY_REDIS_URL"]
    async with (
        SseClient(sse_url(gw.http, rid, token=token("acme"))) as acme,
        SseClient(sse_url(gw.http, rid, token=token("default"))) as default,
    ):
        await eventually(lambda: bool(acme.of_event("subscribed")), 10, "acme subscribed")
        await eventually(lambda: bool(default.of_event("subscribed")), 10, "default subscribed")
        agent = str(uuid.uuid4())
        async with (
            RelayClient.from_url(redis_url) as pub_default,
            RelayClient.from_url(redis_url, tenant="acme") as pub_acme,
        ):
            for i in range(3):
                delta = {"type": "agent_text_delta", "agent_id": agent, "text": f"d{i}"}
                await pub_default.publish(rid, delta)
            await pub_acme.publish(rid, {**delta, "text": "acme"})
        await eventually(lambda: len(default.seqs(rid)) == 3, 10, "default's three")
        await eventually(lambda: len(acme.seqs(rid)) == 1, 10, "acme's one")
        assert [f["text"] for f in acme.frames(rid)] == ["acme"]
        assert all(f["text"] != "acme" for f in default.frames(rid))


async def test_sigterm_ends_streams_with_close_1012(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    async with SseClient(sse_url(gw.http, rid), reconnect=False) as client:
        await eventually(lambda: bool(client.of_event("subscribed")), 10, "subscribed")
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        await eventually(lambda: client.ends == 1, 5, "the stream to end")
        assert client.of_event("close")[0].frame()["code"] == 1012
        assert gw.wait(5) in (0, -signal.SIGTERM), gw.output()
        # Well inside gateway.drain_timeout (8 s), which an open stream used to hold.
        assert time.monotonic() - started < 4


async def test_a_stalled_sse_client_is_bounded_then_caught_up(start_gateway: StartGateway) -> None:
    """A client that stops reading costs its bounded queue; when it reads again it gets
    ``lagged`` and the dropped range from history, while a healthy client is unaffected."""
    gw = start_gateway({"RELAY_GATEWAY_SEND_QUEUE_MAX": "50"})
    rid = str(uuid.uuid4())
    slow = SseClient(sse_url(gw.http, rid, after_seq="0"), reconnect=False)
    slow.receive_buffer = 4096
    async with slow, SseClient(sse_url(gw.http, rid, after_seq="0"), reconnect=False) as healthy:
        await eventually(lambda: bool(slow.of_event("subscribed")), 10, "slow subscribed")
        await eventually(lambda: bool(healthy.of_event("subscribed")), 10, "healthy subscribed")
        slow.flowing.clear()
        count, agent = 3000, str(uuid.uuid4())
        async with RelayClient.from_url(gw.env["RELAY_REDIS_URL"]) as pub:
            text = "x" * 1000
            for _ in range(0, count, 100):
                batch = [{"type": "agent_text_delta", "agent_id": agent, "text": text}] * 100
                await pub.publish_many(rid, batch)
        await eventually(lambda: healthy.seqs(rid)[-1:] == [count], 30, "healthy has all")
        assert healthy.seqs(rid) == list(range(1, count + 1))
        await eventually(lambda: metric(gw, "relay_queue_drops_total") > 0, 10, "queue drops")
        assert not slow.ends  # shed, not dropped: the stream is still open
        slow.flowing.set()
        await eventually(lambda: slow.seqs(rid)[-1:] == [count], 30, "slow caught up")
        assert slow.seqs(rid) == list(range(1, count + 1))
        assert slow.of_event("lagged")


# ---------------------------------------------------------------- through HAProxy

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def sse_connections(topo: Topology) -> dict[str, int]:
    return {n: topo.connections(n) for n, g in topo.gateways.items() if g.alive()}


class Run:
    """What the clients watch: ``relay simulate``, or paced deltas from the SDK."""

    def __init__(self, topo: Topology, rid: str, *, simulated: bool) -> None:
        self.sim = topo.simulate(rid, *MEDIUM_RUN, *QUIET) if simulated else None
        self.task = None if simulated else asyncio.create_task(self._publish(topo.redis.url, rid))

    async def _publish(self, url: str, rid: str) -> None:
        # The SDK retries each publish through an outage (redis.publish_retry_seconds).
        agent = str(uuid.uuid4())
        async with RelayClient.from_url(url) as pub:
            for i in range(120):
                await pub.publish(
                    rid, {"type": "agent_text_delta", "agent_id": agent, "text": f"{i} "}
                )
                await asyncio.sleep(0.03)

    def alive(self) -> bool:
        return self.sim.alive() if self.sim is not None else not self.task.done()  # type: ignore[union-attr]

    async def finish(self) -> None:
        if self.sim is not None:
            assert await wait_exit(self.sim, 90) == 0, self.sim.output()
        else:
            assert self.task is not None
            await asyncio.wait_for(self.task, 90)


async def follow_through_a_disruption(
    topo: Topology, disrupt: Callable[[], None], *, simulated: bool = True, clients: int = 4
) -> list[SseClient]:
    """SSE clients through the balancer follow a run while ``disrupt`` happens midway."""
    rid = str(uuid.uuid4())
    readers = [SseClient(sse_url(topo.lb.http, rid, after_seq="0")) for _ in range(clients)]
    run: Run | None = None
    try:
        for reader in readers:
            reader.start()
        await eventually(
            lambda: sum(sse_connections(topo).values()) == clients, 10, "every client connected"
        )
        run = Run(topo, rid, simulated=simulated)
        await eventually(lambda: all(len(r.seqs(rid)) >= 20 for r in readers), 30, "20 each")
        assert run.alive(), "the run ended before the disruption; make it longer"
        seen = max(len(r.seqs(rid)) for r in readers)
        await asyncio.to_thread(disrupt)
        await run.finish()
        last = await final_seq(topo.lb, rid)
        assert last > seen, "nothing was published after the disruption"
        await eventually(
            lambda: all(r.seqs(rid)[-1:] == [last] for r in readers), 30, "every client at the end"
        )
    finally:
        for reader in readers:
            await reader.stop()
        if run is not None and run.task is not None:
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
    for reader in readers:
        assert reader.seqs(rid) == list(range(1, last + 1)), "duplicates or gaps"
        assert not reader.of_event("resync_required")
    return readers


@needs_haproxy
async def test_sse_clients_of_a_killed_gateway_resume_through_the_balancer(
    topology: Topology,
) -> None:
    victim: list[str] = []

    def kill() -> None:
        name = max(GATEWAYS, key=topology.connections)
        victim.append(name)
        victim.append(str(topology.connections(name)))
        topology.gateways[name].stop(signal.SIGKILL)

    readers = await follow_through_a_disruption(topology, kill)
    assert sum(1 for r in readers if r.connects > 1) >= int(victim[1]) >= 1


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Persistent Redis (appendfsync always): a restart keeps every stream and epoch."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@needs_haproxy
async def test_sse_through_the_balancer_across_a_redis_restart(topology: Topology) -> None:
    # relay simulate does not ride out an outage (its budget calls fail), so
    # the run is published with the SDK, which retries each publish.
    readers = await follow_through_a_disruption(
        topology, lambda: topology.redis.restart(down_for=1.0), simulated=False
    )
    # The streams stayed open across the restart: the hub caught up behind them.
    assert all(r.connects == 1 for r in readers), [r.connects for r in readers]


@needs_haproxy
@pytest.mark.parametrize(("heartbeat", "survives"), [("0.3", True), ("30", False)])
async def test_heartbeats_keep_an_idle_stream_open_through_haproxy(
    tmp_path: Path, start_gateway: StartGateway, heartbeat: str, survives: bool
) -> None:
    """With HAProxy's client/server timeouts at 1 s, only heartbeats keep a quiet stream."""
    gw = start_gateway({"RELAY_SSE_HEARTBEAT_INTERVAL": heartbeat})
    lb = HAProxy(tmp_path, {"gateway1": gw, "gateway2": gw, "gateway3": gw})
    cfg = lb.cfg.read_text()
    for name in ("client", "server"):
        cfg = cfg.replace(f"timeout {name} 30s", f"timeout {name} 1s")
    lb.cfg.write_text(cfg)
    lb.start()
    try:
        rid = str(uuid.uuid4())
        async with SseClient(sse_url(lb.http, rid), reconnect=False) as client:
            await eventually(lambda: bool(client.of_event("subscribed")), 10, "subscribed")
            with contextlib.suppress(TimeoutError):
                # Quiet for 3 s: three times the proxy's idle timeout.
                await eventually(lambda: client.ends > 0, 3, "the proxy to cut the stream")
            assert (client.ends == 0) is survives
            if survives:
                assert sum(m.comments.count("heartbeat") for m in client.messages) >= 3
    finally:
        lb.stop()
