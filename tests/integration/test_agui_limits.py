"""The AG-UI endpoint's refusals and limits against real gateway processes: bad input,
connection caps, a stalled client under the bounded queue, heartbeats, token expiry."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
from typing import Any

import httpx
import pytest

from relay.gateway.auth import mint_token
from relay.orchestrator.client import RelayClient
from tests.agui_checks import verify
from tests.integration.agui_support import (
    SECRET,
    Events,
    contents,
    history,
    jwt_env,
    read_run,
    run_body,
    spawned_event,
    texts,
    url,
)
from tests.support import RedisServer, eventually, metric

pytestmark = pytest.mark.integration


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


class StalledRun:
    """An AG-UI run on a socket that reads nothing until :meth:`read_all`."""

    def __init__(self, port: int, rid: str) -> None:
        self.port, self.rid = port, rid

    async def __aenter__(self) -> StalledRun:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small fixed receive buffer: the gateway's send queue fills, not the kernel.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        self.sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(self.sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock)
        body = json.dumps(run_body("r1")).encode()
        self.writer.write(
            f"POST /agui/requests/{self.rid} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def read_all(self) -> Events:
        """Read on (with a normal buffer) to the end of the response; its events."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        raw = b""
        async with asyncio.timeout(60):
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = await self.reader.read(1 << 16)
                assert data, "the stream ended early"
                raw += data
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        lines = dechunk(rest).split(b"\n")
        return [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")]


async def flood(redis_url: str, rid: str, root: str, until: Any) -> None:
    """The root agent, 4,000 deltas of 1 KB, then (once ``until()``) its completion."""
    async with RelayClient.from_url(redis_url) as pub:
        await pub.publish(rid, spawned_event(root))
        for _ in range(40):
            chunk = [base64.b64encode(os.urandom(750)).decode() for _ in range(100)]
            await pub.publish_text_deltas(rid, root, chunk)
        await eventually(until, 20, "the queue policy to apply")
        done = {"result_summary": "ok", "tokens_used": 1, "duration_ms": 1}
        await pub.publish(rid, {"type": "agent_completed", "agent_id": root, **done})


async def test_a_stalled_stream_follows_the_bounded_queue_policy_and_loses_nothing(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    gw = start_gateway()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    async with StalledRun(gw.port, rid) as run:
        await eventually(lambda: gw.get("/readyz")[1]["watched_requests"] == 1, 10, "attached")
        await flood(redis_server.url, rid, root, lambda: metric(gw, "relay_queue_drops_total") > 0)
        events = await run.read_all()
    verify(events)
    assert events[-1]["type"] == "RUN_FINISHED"
    assert contents(events) == texts(history(redis_server.url, rid))


async def test_with_policy_close_a_stalled_stream_ends_with_run_error(
    redis_server: RedisServer, start_gateway: Any
) -> None:
    gw = start_gateway({"RELAY_GATEWAY_OVERFLOW_POLICY": "close"})
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    async with StalledRun(gw.port, rid) as run:
        await eventually(lambda: gw.get("/readyz")[1]["watched_requests"] == 1, 10, "attached")
        await flood(
            redis_server.url, rid, root, lambda: gw.get("/readyz")[1]["watched_requests"] == 0
        )
        events = await run.read_all()
    verify(events)  # a valid run up to its end
    assert events[-1]["type"] == "RUN_ERROR" and events[-1]["code"] == "relay.overflow"


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
