"""HTTP-level limits against a real gateway: slowloris, idle sockets, long URLs and heads, bodies.

Each attack runs while a well-behaved client on the same gateway is
subscribed and pinging (:func:`bystander`): it must lose no event and keep
answering. Figures (sockets held, RSS, the bystander's latency) are printed
for the report (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import redis

from tests.integration.limits_support import bystander, fds, rss_mb
from tests.support import Gateway, RedisServer, http_get

StartGateway = Callable[..., Gateway]


async def _slow_head(port: int, hold: asyncio.Event) -> float:
    """A slowloris socket: a request head one byte at a time; seconds until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    try:
        for byte in head:
            if time.monotonic() - start > 8:
                break  # held that long: the deadline did not work (the test fails)
            writer.write(bytes([byte]))
            await writer.drain()
            # The attacker's pace (not synchronisation): one byte per 0.2 s.
            with_reply = asyncio.ensure_future(reader.read(1024))
            done, _ = await asyncio.wait([with_reply], timeout=0.2)
            if done:
                return time.monotonic() - start  # answered (408) or closed
            with_reply.cancel()
            if hold.is_set():
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - start


async def test_slowloris_sockets_are_closed_at_the_head_deadline(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway({"RELAY_LIMITS_HEADER_TIMEOUT": "2"})
    base_fds = fds(gw)
    async with bystander(gw, redis_server.url) as seen:
        stop = asyncio.Event()
        attackers = [asyncio.create_task(_slow_head(gw.port, stop)) for _ in range(200)]
        # While they trickle: the gateway still answers HTTP at once.
        t0 = time.monotonic()
        status, _ = await asyncio.to_thread(http_get, gw.http + "/healthz")
        healthz_ms = (time.monotonic() - t0) * 1000
        assert status == 200
        held = fds(gw) - base_fds
        durations = await asyncio.gather(*attackers)
        stop.set()
    assert max(durations) < 4.0, max(durations)  # closed at the 2 s deadline, not held
    assert min(durations) > 1.5, min(durations)
    # Every socket is released again (psutil's count of the gateway's descriptors).
    deadline = time.monotonic() + 5
    while fds(gw) > base_fds + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fds(gw) <= base_fds + 2, (fds(gw), base_fds)
    print(
        f"\nslowloris x200: held {held} fds at peak, all closed within "
        f"{max(durations):.2f}s; /healthz {healthz_ms:.0f} ms; bystander ping median "
        f"{seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms; rss {rss_mb(gw):.0f} MB"
    )


async def test_idle_sockets_beyond_the_pending_cap_are_dropped_oldest_first(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        {"RELAY_LIMITS_HEADER_TIMEOUT": "30", "RELAY_LIMITS_MAX_PENDING_HEADS": "50"}
    )
    base_fds = fds(gw)
    async with bystander(gw, redis_server.url) as seen:
        socks = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(300)]
        # At most the cap stays open on the gateway's side; the others were dropped.
        deadline = time.monotonic() + 5
        while fds(gw) > base_fds + 55 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held = fds(gw) - base_fds
        assert held <= 55, held
        # The first ones were closed (the server hung up: EOF), the last ones are kept.
        first = await asyncio.wait_for(socks[0][0].read(1), 5)
        assert first == b""
        status, _ = await asyncio.to_thread(http_get, gw.http + "/healthz")
        assert status == 200
        for _, writer in socks:
            writer.close()
    print(
        f"\nidle sockets x300 (cap 50): gateway held {held}; rss {rss_mb(gw):.0f} MB; "
        "bystander ping median "
        f"{seen.median_ms:.1f} ms, worst {seen.worst_ms:.1f} ms"
    )


def _exchange(port: int, request: bytes) -> tuple[bytes, float]:
    """Send ``request``; (the whole answer until the server closes, seconds it took)."""
    import socket

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data, time.monotonic() - start


UPGRADE = (
    "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def test_long_urls_and_heads_are_answered_not_held(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway()
    cases = {
        "upgrade, 9 KiB URL": (f"GET /ws/events?x={'a' * 9000} HTTP/1.1\r\n{UPGRADE}\r\n", 414),
        # Under limits.max_url_bytes but over websockets' 8 KiB request line:
        # websockets refuses it; uvicorn used to never send that answer.
        "upgrade, 8180 B URL": (f"GET /ws/events?x={'a' * 8170} HTTP/1.1\r\n{UPGRADE}\r\n", 414),
        "upgrade, 9 KiB header": (
            f"GET /ws/events HTTP/1.1\r\n{UPGRADE}X: {'a' * 9000}\r\n\r\n",
            431,
        ),
        "http, 9 KiB URL": (f"GET /healthz?x={'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        "http, 40 KiB header": (
            f"GET /healthz HTTP/1.1\r\nHost: x\r\nX: {'a' * 40000}\r\n\r\n",
            431,
        ),
        "http, 400 headers": (
            "GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + "".join(f"X-{i}: {'a' * 100}\r\n" for i in range(400))
            + "\r\n",
            431,
        ),
    }
    async with bystander(gw, redis_server.url) as seen:
        for name, (request, status) in cases.items():
            answer, took = await asyncio.to_thread(_exchange, gw.port, request.encode())
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (name, answer[:80])
            assert took < 2.0, (name, took)
    assert gw.output().count("\n") < 20, gw.output()[-2000:]
    print(
        f"\nlong URL/head cases answered at once; rss {rss_mb(gw):.0f} MB; "
        f"bystander worst ping {seen.worst_ms:.1f} ms"
    )


def _post_stream(port: int, path: str, size: int, chunked: bool) -> tuple[bytes, int]:
    """POST ``size`` bytes of body (sent until the server stops reading); (answer, bytes sent)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{length}\r\n\r\n".encode()
        )
        sent = 0
        block = b"a" * 65536
        try:
            while sent < size:
                piece = block if not chunked else b"%x\r\n%s\r\n" % (len(block), block)
                s.sendall(piece)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and hung up: the rest is never read
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data, sent


async def test_rest_bodies_are_read_bounded_and_refused_413(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway()
    base_rss = rss_mb(gw)
    target = str(uuid.uuid4())
    path = f"/api/v1/agents/{target}/cancel"
    async with bystander(gw, redis_server.url) as seen:
        for chunked in (False, True):
            t0 = time.monotonic()
            answer, sent = await asyncio.to_thread(_post_stream, gw.port, path, 100 << 20, chunked)
            took = time.monotonic() - t0
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            assert b'"code":"body_too_large"' in answer
            assert sent < 100 << 20  # the gateway stopped reading
            print(f"\n100 MiB body (chunked={chunked}): 413 after {sent >> 10} KiB, {took:.2f}s")
    grown = rss_mb(gw) - base_rss
    assert grown < 20, grown
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.keys("relay:*:cancel:*") == []  # nothing was acted on
    finally:
        r.close()
    print(f"REST bodies: rss +{grown:.1f} MB; bystander worst ping {seen.worst_ms:.1f} ms")
