"""A small SSE client for tests and benchmarks, reconnecting the way ``EventSource`` does.

It speaks HTTP/1.1 over asyncio streams (chunked or not), parses the event
stream incrementally, and, when the stream ends or the connection drops,
waits the ``retry:`` delay and reconnects with ``Last-Event-ID`` set to the
last id it got. A non-200 answer stops it, as it stops a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Message:
    """One SSE block, with the fields as the EventSource algorithm reads them."""

    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: str | None = None

    def frame(self) -> dict[str, Any]:
        """The data lines as the JSON frame they carry."""
        value: dict[str, Any] = json.loads("\n".join(self.data))
        return value


def parse_block(block: str) -> Message:
    """Parse one block (the text between two blank lines)."""
    msg = Message()
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            msg.comments.append(value)
        elif name == "id":
            msg.id = value
        elif name == "event":
            msg.event = value
        elif name == "data":
            msg.data.append(value)
        elif name == "retry":
            msg.retry = value
    return msg


def parse_stream(raw: bytes) -> list[Message]:
    """Every complete block of an event-stream body (an unfinished last one is left out)."""
    return [parse_block(b) for b in raw.decode().split("\n\n")[:-1]]


async def _body(
    reader: asyncio.StreamReader, chunked: bool, length: int | None = None
) -> AsyncIterator[bytes]:
    if length is not None:
        # A refusal has a Content-Length and a kept-alive connection: reading
        # to EOF waited for the server's keep-alive timeout (5 s) each time.
        yield await reader.readexactly(length)
        return
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


class SseClient:
    """Reads ``url`` (``http://host:port/path?query``) until stopped, reconnecting like a browser.

    ``on_message`` (optional) sees each message as it arrives; ``messages``
    keeps them unless ``keep=False`` (benchmarks).
    """

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        last_event_id: str | None = None,
        reconnect: bool = True,
        keep: bool = True,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = headers or {}
        self.last_event_id = last_event_id
        self.reconnect = reconnect
        self.keep = keep
        self.on_message = on_message
        self.messages: list[Message] = []
        self.retry_ms = 1000
        self.connects = 0
        self.ends = 0
        self.status: int | None = None
        self.refusal: Any = None
        """The JSON body of a non-200 answer."""
        self.response_headers: dict[str, str] = {}
        self.task: asyncio.Task[None] | None = None
        self.open = asyncio.Event()
        self.flowing = asyncio.Event()
        """Cleared: the client stops reading (the kernel buffers fill, then the gateway's queue)."""
        self.flowing.set()
        self.receive_buffer = 0
        """SO_RCVBUF of the socket (0: the kernel's autotuning), so a paused client stalls soon."""

    # ---------------------------------------------------------------- reading

    def frames(self, rid: str) -> list[dict[str, Any]]:
        """The event frames of ``rid`` received (every connection, in order)."""
        out = []
        for m in self.messages:
            if m.data and m.event not in (None, "close"):
                frame = m.frame()
                if "ts" in frame and frame.get("request_id") == rid:
                    out.append(frame)
        return out

    def seqs(self, rid: str) -> list[int]:
        return [f["seq"] for f in self.frames(rid)]

    def of_event(self, name: str) -> list[Message]:
        return [m for m in self.messages if m.event == name]

    # ---------------------------------------------------------------- running

    def start(self) -> SseClient:
        self.task = asyncio.create_task(self.run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def __aenter__(self) -> SseClient:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> None:
        while True:
            try:
                if not await self._once():
                    return  # refused: a browser stops too
            except (OSError, asyncio.IncompleteReadError, ValueError):
                pass  # a dropped connection: reconnect
            self.ends += 1
            self.open.clear()
            if not self.reconnect:
                return
            await asyncio.sleep(self.retry_ms / 1000)

    async def _once(self) -> bool:
        sock = socket.socket()
        if self.receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
        try:
            head = {"Host": f"{self.host}:{self.port}", "Accept": "text/event-stream"}
            head.update(self.headers)
            if self.last_event_id:
                head["Last-Event-ID"] = self.last_event_id
            lines = [f"GET {self.target} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise OSError("connection closed before the status line")
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            self.response_headers = headers
            chunked = "chunked" in headers.get("transfer-encoding", "")
            if status != 200:
                length = headers.get("content-length")
                size = int(length) if length is not None and not chunked else None
                body = b"".join([c async for c in _body(reader, chunked, size)])
                with contextlib.suppress(ValueError):
                    self.refusal = json.loads(body)
                self.status = status
                return False
            self.status = status
            self.connects += 1
            self.open.set()
            buffer = b""
            async for chunk in _body(reader, chunked):
                await self.flowing.wait()
                buffer += chunk
                while (cut := buffer.find(b"\n\n")) >= 0:
                    block, buffer = buffer[:cut], buffer[cut + 2 :]
                    self._receive(parse_block(block.decode()))
            return True
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _receive(self, msg: Message) -> None:
        if msg.id is not None:
            self.last_event_id = msg.id
        if msg.retry is not None and msg.retry.isdigit():
            self.retry_ms = int(msg.retry)
        if self.keep:
            self.messages.append(msg)
        if self.on_message is not None:
            self.on_message(msg)
