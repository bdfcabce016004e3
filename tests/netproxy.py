"""A TCP proxy for tests: put it between a process and redis-server, then break the network.

The proxy runs its own asyncio loop in a background thread, so it keeps
forwarding while the test's own loop is blocked (a synchronous ``/readyz``
call, ``Gateway.start()`` waiting for readiness through the proxy). Every
control is applied on the proxy's loop and has taken effect when the call
returns.

The failures it produces are the ones that hurt in production:

* :meth:`NetProxy.blackhole` keeps the sockets open and silently stops
  forwarding: what a half-open connection looks like after a failover or a
  NAT/conntrack timeout. Nothing errors, nothing arrives. By default only
  pub/sub connections (those that sent a ``SUBSCRIBE``) are hit, and also
  the ones opened while the blackhole lasts: a subscriber that rebuilds its
  connection gets another dead one until :meth:`NetProxy.restore`.
  A blackholed connection stays dead (a half-open socket never heals); it
  goes away when its client closes it or on :meth:`NetProxy.sever`.
* :meth:`NetProxy.sever` closes every proxied connection (a server crash, a
  ``CLIENT KILL``, a reset by a middlebox).
* :meth:`NetProxy.refuse` accepts and immediately resets new connections (a
  server that is down or not yet listening again behind a load balancer).

Buffers are bounded: each direction reads at most ``CHUNK`` bytes and waits
for the other side to drain before reading more; blackholed bytes are
discarded, never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

CHUNK = 65536

# RESP arrays as clients send them: ``$9\r\nSUBSCRIBE\r\n`` or ``$10\r\nPSUBSCRIBE\r\n``
# (``SSUBSCRIBE`` too). UNSUBSCRIBE is ``$11`` and does not match.
_SUBSCRIBE = re.compile(rb"\$(?:9\r\nsubscribe|10\r\n[ps]subscribe)\r\n", re.IGNORECASE)
_TAIL = 32  # bytes of the previous chunk kept to find a command split across reads

T = TypeVar("T")


@dataclass(eq=False)
class Link:
    """One proxied connection: a client socket and its upstream socket."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pubsub: bool = False
    """The client sent a SUBSCRIBE on this connection."""
    drop_down: bool = False
    """Discard server → client bytes."""
    drop_up: bool = False
    """Discard client → server bytes."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class NetProxy:
    """A loopback TCP proxy in front of ``upstream_port`` with failure controls."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.links: set[Link] = set()
        self.accepted = 0
        self.refused = 0
        self.blackholed = 0
        """Connections blackholed so far (existing ones and new ones while it lasts)."""
        self._refusing = False
        self._hole: tuple[bool, bool] | None = None  # (pubsub_only, both_directions)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> NetProxy:
        """Listen on a free loopback port; returns once it accepts connections."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self._thread.start()
        ready.result(10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Redis URL that goes through this proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    # ---------------------------------------------------------------- controls

    def blackhole(
        self,
        *,
        pubsub_only: bool = True,
        both_directions: bool = False,
        new_connections: bool = True,
    ) -> int:
        """Keep sockets open but stop forwarding server → client (and client → server).

        Returns how many open connections were hit. With ``new_connections``
        every matching connection opened (or subscribing) from now on until
        :meth:`restore` is hit as well.
        """

        def apply() -> int:
            if new_connections:
                self._hole = (pubsub_only, both_directions)
            hit = 0
            for link in self.links:
                if link.pubsub or not pubsub_only:
                    hit += self._kill(link, both_directions)
            return hit

        return self._call(apply)

    def sever(self) -> int:
        """Reset every proxied connection; returns how many there were."""

        def apply() -> int:
            links = list(self.links)
            for link in links:
                link.abort()
            return len(links)

        return self._call(apply)

    def refuse(self, on: bool = True) -> None:
        """While on, accept new connections and reset them at once."""

        def apply() -> None:
            self._refusing = on

        self._call(apply)

    def restore(self) -> None:
        """Stop refusing and stop blackholing new connections.

        Connections already blackholed stay dead, like a half-open socket.
        """

        def apply() -> None:
            self._refusing = False
            self._hole = None

        self._call(apply)

    def count(self, *, pubsub: bool | None = None, dead: bool | None = None) -> int:
        """Open connections, optionally only pub/sub ones, or only (not) blackholed ones."""

        def apply() -> int:
            return sum(
                1
                for link in self.links
                if (pubsub is None or link.pubsub == pubsub)
                and (dead is None or link.drop_down == dead)
            )

        return self._call(apply)

    # ---------------------------------------------------------------- internals

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy loop and return its result (controls are atomic)."""
        assert self._loop is not None, "proxy not started"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _main(self, ready: Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0, limit=CHUNK)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            raise
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _kill(self, link: Link, both_directions: bool) -> int:
        if link.drop_down:
            return 0
        link.drop_down = True
        link.drop_up = link.drop_up or both_directions
        self.blackholed += 1
        return 1

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            self.refused += 1
            cw.transport.abort()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.upstream, limit=CHUNK)
        except OSError:
            cw.transport.abort()
            return
        link = Link(cw, sw)
        if self._hole is not None and not self._hole[0]:
            self._kill(link, self._hole[1])
        self.links.add(link)
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._pump_up(link, cr)),
            loop.create_task(self._pump_down(link, sr)),
        ]
        try:
            # Either side closing (or an abort) ends the whole link.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.links.discard(link)
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            link.abort()

    async def _pump_up(self, link: Link, reader: asyncio.StreamReader) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if not link.pubsub and _SUBSCRIBE.search(tail + data):
                    link.pubsub = True
                    # Marked before the SUBSCRIBE is forwarded, so not even
                    # its confirmation gets through a blackhole.
                    if self._hole is not None and self._hole[0]:
                        self._kill(link, self._hole[1])
                tail = data[-_TAIL:]
                if link.drop_up:
                    continue
                link.upstream.write(data)
                await link.upstream.drain()

    async def _pump_down(self, link: Link, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if link.drop_down:
                    continue
                link.client.write(data)
                await link.client.drain()
