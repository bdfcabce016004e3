"""WebSocket limits against a real gateway: connections, fragments, command rate, cancels, replay.

Each attack runs while a well-behaved client on the same gateway is
subscribed and pinging (:func:`bystander`): it must lose no event and keep
answering. Attackers present another peer address with ``X-Forwarded-For``
(the gateway trusts it from loopback, as behind a load balancer), so the
per-subject limits, keyed on the peer address until tokens exist, charge
them and not the bystander. Figures are printed for the report (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import websockets
from websockets.frames import Opcode

from relay.orchestrator.client import RelayClient
from tests.integration.limits_support import RawWs, bystander, rss_mb
from tests.support import Gateway, RedisServer, WsClient, eventually, metric, seqs

StartGateway = Callable[..., Gateway]


def forwarded(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


async def _connect(gw: Gateway, ip: str) -> tuple[Any, int | None]:
    """Open a WebSocket as ``ip``; (the connection, the close code if it was closed at once)."""
    ws = await websockets.connect(
        gw.ws_url + "?stream=none", additional_headers=forwarded(ip), max_size=None
    )
    try:
        reply = await asyncio.wait_for(ws.recv(), 0.5)
        raise AssertionError(f"unexpected frame {reply!r}")
    except websockets.ConnectionClosed as closed:
        return ws, closed.rcvd.code if closed.rcvd else None
    except TimeoutError:
        return ws, None


async def test_connections_per_subject_and_per_gateway_close_1013(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {"RELAY_LIMITS_MAX_CONNECTIONS": "40", "RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": "10"}
    )
    async with bystander(gw, redis_server.url) as seen:
        # One subject opens 30: 10 are kept, 20 closed with 1013.
        one = await asyncio.gather(*(_connect(gw, "10.0.0.1") for _ in range(30)))
        codes = [code for _, code in one]
        assert codes.count(None) == 10 and codes.count(1013) == 20, codes
        # Many subjects open 50 more: the gateway keeps 40 in all (the bystander is one).
        many = await asyncio.gather(*(_connect(gw, f"10.0.1.{i}") for i in range(50)))
        codes = [code for _, code in many]
        assert codes.count(None) == 40 - 10 - 1, codes
        assert codes.count(1013) == 50 - (40 - 10 - 1), codes
        rss = rss_mb(gw)
        for ws, _ in one + many:
            await ws.close()
        # Survived: once they are gone, new connections are admitted again.
        await eventually(lambda: metric(gw, "relay_connections") == 1, 10, "attackers gone")
        again = [await _connect(gw, "10.0.0.1") for _ in range(3)]
        assert [code for _, code in again] == [None] * 3
        for ws, _ in again:
            await ws.close()
    print(
        f"\nconnections: 80 attempts, 39+1 held, 41 closed 1013; rss {rss:.0f} MB; "
        f"bystander ping median {seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )


async def _unfinished(gw: Gateway, fragments: int, size: int) -> RawWs:
    """A connection that sends ``fragments`` fragments of one message and never the last."""
    ws = await RawWs(gw.port).connect()
    ws.send_frame(Opcode.TEXT, b"{" * min(size, 1) + b" " * max(size - 1, 0), fin=False)
    for _ in range(fragments - 1):
        ws.send_frame(Opcode.CONT, b" " * size, fin=False)
    with contextlib.suppress(ConnectionError):  # refused while sending: read the close below
        await ws.drain()
    return ws


async def _closed_with(ws: RawWs, timeout: float = 0.5) -> int | None:
    """The close code the gateway sent within ``timeout``, or None if it kept the connection."""
    try:
        return await ws.close_code(timeout)
    except TimeoutError:
        return None


async def test_unfinished_fragmented_messages_stay_bounded(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {
            "RELAY_LIMITS_MAX_FRAGMENT_BUFFER_BYTES": str(14 << 20),
            # All on loopback: the per-subject connection cap is not what is tested.
            "RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": "1000",
        }
    )
    base = rss_mb(gw)
    async with bystander(gw, redis_server.url) as seen:
        # 200 connections, each with an unfinished message of 60 x 1 KiB
        # fragments (under every per-message cap): held, bounded in all.
        holders = [await _unfinished(gw, 60, 1024) for _ in range(200)]
        rss_held = rss_mb(gw) - base
        # More fragments than a message may have: 1009.
        many = await _unfinished(gw, 65, 16)
        assert await many.close_code() == 1009
        # Empty fragments cost no bytes but still count.
        empty = await _unfinished(gw, 65, 0)
        assert await empty.close_code() == 1009
        # Unfinished bytes over the hard message ceiling (128 KiB): 1009.
        big = await _unfinished(gw, 33, 4096)
        assert await big.close_code() == 1009
        # Over the process budget of unfinished bytes (14 MiB, 11.7 held): the
        # connections whose fragments would pass it are closed 1013.
        # (60 KiB each, one TCP segment: the gateway reads what it refuses, so
        # its close frame is not lost to a reset.)
        extra = [await _unfinished(gw, 15, 4096) for _ in range(60)]
        codes = await asyncio.gather(*(_closed_with(w) for w in extra))
        assert codes[:30] == [None] * 30 and codes[-15:] == [1013] * 15, str(codes)
        assert set(codes) == {None, 1013}, codes
        # The connections held all along are untouched.
        assert await asyncio.gather(*(_closed_with(w) for w in holders[:20])) == [None] * 20
        rss_peak = rss_mb(gw) - base
        for w in [*holders, *extra, many, empty, big]:
            w.close()
    assert rss_peak < 40, rss_peak
    print(
        f"\nfragments: 200 connections x 60 KiB unfinished held, rss +{rss_held:.1f} MB; "
        f"with 60 more x 60 KiB (budget 14 MiB, over it 1013) +{rss_peak:.1f} MB; "
        f"bystander ping median {seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )


async def test_command_flood_is_rate_limited_then_closed_1008(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {
            "RELAY_LIMITS_COMMAND_RATE": "20",
            "RELAY_LIMITS_COMMAND_BURST": "30",
            "RELAY_LIMITS_RATE_LIMIT_STRIKES": "50",
        }
    )
    async with bystander(gw, redis_server.url) as seen:
        async with WsClient(gw.ws_url + "?stream=none") as flood:
            for i in range(500):
                await flood.send({"type": "ping", "command_id": i})
            await asyncio.wait_for(flood.closed.wait(), 10)
            assert flood.close_code == 1008
            pongs = flood.of_type("pong")
            limited = [f for f in flood.frames if f.get("code") == "rate_limited"]
            # The burst (30) and what refilled meanwhile is answered, then 50
            # refusals (all sent before the close), then 1008.
            assert 30 <= len(pongs) <= 40 and len(limited) == 50, (len(pongs), len(limited))
            assert {f.get("type") for f in flood.frames} == {"pong", "error"}
            assert [f["command_id"] for f in pongs] == list(range(len(pongs)))
            # The refusal names the command it refuses and when to try again.
            assert all(isinstance(f["command_id"], int) and f["retry_after"] > 0 for f in limited)
        # A client within the rate is never refused.
        async with WsClient(gw.ws_url + "?stream=none") as polite:
            for i in range(40):
                reply = await polite.request({"type": "ping", "command_id": i}, "pong")
                assert reply == {"type": "pong", "command_id": i}
                await asyncio.sleep(0.06)  # the client's own pace (~16/s), not synchronisation
            assert not polite.of_type("error")
    print(
        f"\ncommand flood: {len(pongs)} answered, {len(limited)} rate_limited, then 1008; "
        f"rss {rss_mb(gw):.0f} MB; "
        f"bystander ping median {seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )


async def test_cancel_flood_is_capped_per_subject(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {
            "RELAY_LIMITS_CANCELS_PER_MINUTE": "30",
            "RELAY_LIMITS_COMMAND_RATE": "10000",
            "RELAY_LIMITS_COMMAND_BURST": "10000",
        }
    )
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with bystander(gw, redis_server.url) as seen:
            url = gw.ws_url + "?stream=none"
            flood = WsClient(url)
            flood.ws = await websockets.connect(url, additional_headers=forwarded("10.0.0.7"))
            flood._task = asyncio.create_task(flood._read())
            try:
                t0 = time.monotonic()
                for i in range(1000):
                    await flood.send(
                        {"type": "cancel_agent", "agent_id": str(uuid.uuid4()), "command_id": i}
                    )
                await flood.wait_for(lambda c: len(c.frames) >= 1000, 20)
                took = time.monotonic() - t0
                acks = flood.of_type("ack")
                limited = [f for f in flood.frames if f.get("code") == "rate_limited"]
                assert len(acks) == 30 and len(limited) == 970, (len(acks), len(limited))
                assert {f["command_id"] for f in limited} <= set(range(1000))
                assert flood.close_code is None  # refused, not disconnected
            finally:
                await flood.close()
            # The same subject over REST is refused too (429); another subject is not.
            status, body = await asyncio.to_thread(
                _post, gw, f"/api/v1/agents/{uuid.uuid4()}/cancel", "10.0.0.7"
            )
            assert status == 429 and body["code"] == "rate_limited", (status, body)
            assert body["retry_after"] > 0
            status, body = await asyncio.to_thread(
                _post, gw, f"/api/v1/agents/{uuid.uuid4()}/cancel", "10.0.0.8"
            )
            assert status == 202, (status, body)
        tombstones = len(r.keys("relay:*:cancel:*"))
        assert tombstones == 31, tombstones
    finally:
        r.close()
    print(
        f"\ncancel flood: 1000 in {took:.2f}s -> 30 tombstones, 970 rate_limited; "
        f"rss {rss_mb(gw):.0f} MB; "
        f"bystander ping median {seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )


def _post(gw: Gateway, path: str, ip: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        gw.http + path,
        data=b"{}",
        method="POST",
        headers={"content-type": "application/json", **forwarded(ip)},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_replay_volume_is_capped_per_connection(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway({"RELAY_LIMITS_REPLAY_BYTES_PER_MINUTE": str(1 << 20)})
    rid = str(uuid.uuid4())
    async with RelayClient.from_url(redis_server.url) as pub:
        for _ in range(6):
            await pub.publish_many(
                rid,
                [
                    {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": "x" * 1000}
                    for _ in range(500)
                ],
            )
    async with bystander(gw, redis_server.url) as seen:
        async with WsClient(gw.ws_url + "?stream=none") as greedy:
            sub = {"type": "subscribe", "request_id": rid, "after_seq": 0, "command_id": "a"}
            await greedy.send(sub)
            await greedy.wait_for(lambda c: bool(c.of_type("resync_required")), 15)
            cut = greedy.of_type("resync_required")[0]
            assert cut["reason"] == "replay_limited", cut
            got = seqs(greedy.frames, rid)
            # About 1 MiB of ~1.1 KB events, in order from 1, then the cut.
            assert 800 <= len(got) <= 1000 and got == list(range(1, len(got) + 1)), len(got)
            assert cut["next_seq"] == len(got) + 1
            # Asking again at once: refused, with when to retry.
            reply = await greedy.request({**sub, "command_id": "b"}, "subscribed")
            assert reply["code"] == "rate_limited" and reply["command_id"] == "b", reply
            assert reply["retry_after"] > 0
        # A client resuming after a short outage (the last 200 events) is served in full.
        async with WsClient(gw.ws_url + f"?request_id={rid}&after_seq=2800") as resumed:
            await resumed.wait_for(lambda c: len(seqs(c.frames, rid)) >= 200, 15)
            assert seqs(resumed.frames, rid) == list(range(2801, 3001))
            assert not resumed.of_type("resync_required") and not resumed.of_type("error")
    print(
        f"\nreplay: after_seq=0 of 3000 x 1 KB cut after {len(got)} events (1 MiB/min), "
        f"again -> rate_limited; resume of 200 served; rss {rss_mb(gw):.0f} MB; "
        "bystander ping median "
        f"{seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )
