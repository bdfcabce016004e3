"""Helpers of the limits and fuzzing tests: a raw WebSocket, a well-behaved bystander, figures.

The raw WebSocket writes frames byte by byte as an attacker would (unfinished
fragments, frames the websockets client refuses to build); the bystander is
the client that must lose nothing while an attack runs on the same gateway:
it is subscribed to a request that is published to throughout, and it pings
the gateway to measure its latency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psutil
from websockets.frames import Frame, Opcode

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, WsClient, eventually, seqs


def gateway_process(gw: Gateway) -> psutil.Process:
    assert gw.proc is not None
    return psutil.Process(gw.proc.pid)


def rss_mb(gw: Gateway) -> float:
    return float(gateway_process(gw).memory_info().rss) / 2**20


def fds(gw: Gateway) -> int:
    return int(gateway_process(gw).num_fds())


class RawWs:
    """A WebSocket client on a bare socket: frames are written exactly as given."""

    def __init__(self, port: int, path: str = "/ws/events?stream=none", headers: str = "") -> None:
        self.port = port
        self.path = path
        self.headers = headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._out: list[bytes] = []

    async def connect(self) -> RawWs:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{self.headers}\r\n"
            ).encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return self

    def send_frame(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        """Buffer one frame (written with the next :meth:`drain`, several in one segment)."""
        self._out.append(Frame(opcode, data, fin).serialize(mask=True))

    async def drain(self) -> None:
        assert self.writer is not None
        # One write: the gateway reads what it refuses in the same read, so its
        # close is not turned into a reset by bytes still arriving.
        self.writer.write(b"".join(self._out))
        self._out.clear()
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (servers do not mask): (opcode, payload)."""
        assert self.reader is not None
        b0, b1 = await self.reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(length)

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server's close frame; its code (None if the socket just ended)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    opcode, payload = await self.read_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return None
                if opcode == Opcode.CLOSE.value:
                    return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Bystander:
    """A well-behaved client on the attacked gateway, and what it saw."""

    client: WsClient
    request_id: str
    published: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def worst_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def median_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[len(ordered) // 2] if ordered else 0.0

    async def _run(self, pub: RelayClient, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            self.published = await pub.publish(
                self.request_id,
                {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": "x" * 64},
            )
            n += 1
            before = len(self.client.frames)
            start = time.monotonic()
            await self.client.send({"type": "ping", "command_id": f"by-{n}"})
            # Polled every millisecond: the figure is the gateway's, not the poll's.
            cid, frames = f"by-{n}", self.client.frames
            await eventually(
                lambda: any(f.get("command_id") == cid for f in frames[before:]),  # noqa: B023
                15,
                "the bystander's pong",
                interval=0.001,
            )
            self.latencies_ms.append((time.monotonic() - start) * 1000)
            reply = next(f for f in self.client.frames[before:] if "command_id" in f)
            assert reply == {"type": "pong", "command_id": f"by-{n}"}, reply
            # Paced, not synchronising: a steady trickle across the attack.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


@contextlib.asynccontextmanager
async def bystander(gw: Gateway, redis_url: str) -> AsyncIterator[Bystander]:
    """Run a bystander during the ``async with`` body; on exit, assert it lost nothing."""
    rid = str(uuid.uuid4())
    async with (
        WsClient(f"{gw.ws_url}?request_id={rid}") as client,
        RelayClient.from_url(redis_url) as pub,
    ):
        await client.request({"type": "ping"}, "pong")
        seen = Bystander(client, rid)
        stop = asyncio.Event()
        task = asyncio.create_task(seen._run(pub, stop))
        try:
            yield seen
            # It also ran while the attack's effects were still on the gateway.
            await eventually(lambda: len(seen.latencies_ms) >= 3, 15, "bystander rounds")
        finally:
            stop.set()
            await task
        await client.wait_for(lambda c: len(seqs(c.frames, rid)) >= seen.published, timeout=15)
        assert seqs(client.frames, rid) == list(range(1, seen.published + 1))
        assert client.close_code is None
        assert not client.of_type("error"), client.of_type("error")
