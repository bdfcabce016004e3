"""Run the gateway under uvicorn: the Python API behind ``relay gateway``.

On SIGTERM uvicorn stops accepting, closes every WebSocket with 1012
(service restart, so clients reconnect elsewhere and resume with
``after_seq``), waits up to ``gateway.drain_timeout`` for connections to
finish, then runs the lifespan shutdown; the process exits well inside 10 s.

The HTTP and WebSocket protocols uvicorn runs are small subclasses of its
own (httptools and websockets-sansio) that add what uvicorn lacks
(``[limits]``): a deadline for the request head (uvicorn arms no timer
before the first request, and a keep-alive timer that the first byte of a
new request cancels, so a slowloris client held its socket forever), a
bound on the URL and the head (answered 414 / 431, not held), a cap on
sockets still sending their head (the oldest is dropped first), an answer
to WebSocket handshakes the websockets parser refuses (uvicorn never wrote
the 414/431 it prepared, and the socket hung), and bounds on fragmented
messages (fragments per message, and unfinished bytes per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http
import logging
import resource
import socket
from collections import OrderedDict
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

from relay.config import GlobalConfig, LimitsConfig
from relay.gateway.app import create_app
from relay.gateway.eventstream import Drain
from relay.gateway.limits import CLOSE_MESSAGE_TOO_BIG, CLOSE_TRY_AGAIN_LATER
from relay.logs import LogOnce

log = logging.getLogger(__name__)
log_once = LogOnce(log)


def _response(status: int, text: str) -> bytes:
    body = text.encode()
    phrase = http.HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that is over a limit."""


def bound_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """Fix the socket's kernel send buffer at ``size`` bytes (``gateway.socket_send_buffer``).

    Linux grows an autotuned send buffer to ``tcp_wmem``'s maximum (4 MiB by
    default) for a peer that does not read; a few thousand such peers reach
    the kernel's TCP memory pressure limit, and from then on every socket of
    the machine stalls. A fixed buffer makes back-pressure reach the writer,
    whose queue applies the overflow policy. The WebSocket protocol takes
    over this same socket on upgrade, so one call covers HTTP and WebSocket.
    """
    sock = transport.get_extra_info("socket")
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def http_protocol(limits: LimitsConfig, send_buffer: int = 0) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a head deadline, head size limits and a
    fixed socket send buffer of ``send_buffer`` bytes (0: the kernel's autotuning)."""
    # Sockets whose request head is incomplete, oldest first: one registry per
    # server (the class made here), touched only from the event loop.
    pending: OrderedDict[int, GuardedHttpProtocol] = OrderedDict()

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._in_head = False
            self._head_bytes = 0
            self._url_bytes = 0
            self._field_bytes = 0
            self._refusal: tuple[int, str] | None = None

        # ------------------------------------------------------------ the head

        def _start_head(self) -> None:
            self._in_head = True
            self._head_bytes = self._url_bytes = self._field_bytes = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timeout)
            pending[id(self)] = self
            if len(pending) > limits.max_pending_heads:
                _, oldest = pending.popitem(last=False)
                oldest._drop(None)

        def _end_head(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            pending.pop(id(self), None)

        def _head_timeout(self) -> None:
            self._head_timer = None
            # Nothing sent at all: just close (there is no request to answer).
            self._drop((408, "request head not received in time") if self._head_bytes else None)

        def _drop(self, answer: tuple[int, str] | None) -> None:
            self._end_head()
            if self.transport is None or self.transport.is_closing():
                return
            if answer is not None:
                self.transport.write(_response(*answer))
            self.transport.close()

        def _refuse(self, status: int, text: str) -> None:
            self._refusal = (status, text)
            raise _Refused(text)

        # ------------------------------------------------------------ uvicorn hooks

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            bound_send_buffer(transport, send_buffer)
            self._start_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._end_head()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A kept-alive socket gets a new deadline for its next head; a
            # pipelined request already has its head, and started just now.
            if not self.transport.is_closing() and self.timeout_keep_alive_task is not None:
                self._start_head()

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > limits.max_url_bytes:
                self._refuse(414, f"request target exceeds {limits.max_url_bytes} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._field_bytes += len(name) + len(value) + 4
            if self._url_bytes + self._field_bytes > limits.max_header_bytes:
                self._refuse(431, f"request head exceeds {limits.max_header_bytes} bytes")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._end_head()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if not self._in_head and self.cycle is not None and self.cycle.response_complete:
                self._start_head()  # the first byte of a request after a keep-alive pause
            if self._in_head:
                self._head_bytes += len(data)
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self._refusal is None:
                    # uvicorn's own answer, logged once (uvicorn logs every one).
                    msg = "Invalid HTTP request received."
                    log_once("invalid-http", "%s (logged once)", msg)
                    self.send_400_response(msg)
                    return
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            # A refusal is raised in a callback and comes back as a parser
            # error; it is answered with its own status, without a log line
            # (a client repeating it must not grow the log).
            if self._refusal is not None:
                self._drop(self._refusal)
            elif self._in_head and self._head_bytes > limits.max_header_bytes:
                # A field still being received (httptools buffers it whole).
                self._drop((431, f"request head exceeds {limits.max_header_bytes} bytes"))

    return GuardedHttpProtocol


def ws_protocol(limits: LimitsConfig) -> type[asyncio.Protocol]:
    """uvicorn's websockets-sansio protocol with fragment limits and handshake answers."""
    # Bytes of unfinished fragmented messages in this process, for one budget.
    buffered = [0]

    class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fragment_bytes = 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self.handshake_initiated and self.conn.handshake_exc is not None:
                # websockets refused the handshake (request line or a header
                # too long, too many headers) and prepared the answer; uvicorn
                # never sends it, and the socket would hang.
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._unbuffer()
            super().connection_lost(exc)

        def _unbuffer(self) -> None:
            buffered[0] -= self._fragment_bytes
            self._fragment_bytes = 0

        def _fail(self, code: int, reason: str) -> None:
            self._unbuffer()
            self.frames = []
            if self.close_sent or self.transport.is_closing():
                return
            self.conn.fail(code, reason)
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()

        def _account(self, event: Frame) -> bool:
            """Track an unfinished message; False when it was refused (connection failed)."""
            if event.fin:
                self._unbuffer()
                return True
            if len(self.frames) >= limits.max_message_fragments:
                self._fail(CLOSE_MESSAGE_TOO_BIG, "message has too many fragments")
                return False
            size = len(event.data)
            if buffered[0] + size > limits.max_fragment_buffer_bytes:
                self._fail(CLOSE_TRY_AGAIN_LATER, "gateway busy; try again later")
                return False
            self._fragment_bytes += size
            buffered[0] += size
            return True

        def handle_text(self, event: Frame) -> None:
            self._unbuffer()
            self.frames = []
            if self._account(event):
                super().handle_text(event)

        def handle_bytes(self, event: Frame) -> None:
            self._unbuffer()
            self.frames = []
            if self._account(event):
                super().handle_bytes(event)

        def handle_cont(self, event: Frame) -> None:
            if self._account(event):
                super().handle_cont(event)

    return GuardedWebSocketProtocol


def uvicorn_config(config: GlobalConfig) -> uvicorn.Config:
    """The uvicorn settings derived from relay's configuration."""
    gw = config.gateway
    limits = config.limits
    return uvicorn.Config(
        create_app(config),
        host=gw.host,
        port=gw.port,
        http=http_protocol(limits, gw.socket_send_buffer),
        ws=ws_protocol(limits),
        # Protocol pings close dead peers; the size limit is a hard ceiling
        # above max_message_bytes (answered with an error frame), and counts
        # unfinished fragments: a larger message closes with 1009.
        ws_ping_interval=gw.ping_interval,
        ws_ping_timeout=gw.ping_timeout,
        ws_max_size=max(limits.max_ws_message_bytes, gw.max_message_bytes),
        ws_per_message_deflate=gw.ws_per_message_deflate,
        timeout_graceful_shutdown=int(gw.drain_timeout),
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


def check_descriptors(config: GlobalConfig) -> int:
    """Raise the open-file limit to what ``[limits]`` needs, if allowed; warn when it cannot.

    The connection caps only protect the gateway if they are reached before
    the descriptor limit: at that limit ``accept`` fails and nothing is served,
    /readyz included. Returns the soft limit in force.
    """
    need = (
        config.limits.max_connections
        + config.limits.max_pending_heads
        + config.redis.max_connections
        + 64  # pub/sub, control pool, listening socket, logs, the interpreter
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open-file limit %d is below what limits.max_connections + "
            "limits.max_pending_heads need (%d): lower them or raise `ulimit -n`",
            soft,
            need,
        )
    return soft


class GatewayServer(uvicorn.Server):
    """uvicorn's server; on shutdown it first ends the app's HTTP streams (SSE).

    uvicorn waits up to ``timeout_graceful_shutdown`` for running responses,
    and a stream never finishes by itself: each one is ended with a ``close``
    event instead, so its client reconnects to another gateway at once.
    Listening sockets are closed in the same step, before any stream sees
    the signal, so nobody reconnects to this process.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if isinstance(drain, Drain):
            drain.start()
        await super().shutdown(sockets)


GC_THRESHOLDS = (20_000, 50, 100)
"""The cyclic collector's thresholds in a gateway process (Python's: 700, 10, 10).

Every delivery allocates a few short-lived objects (a queue entry, the ASGI
message, futures), so at the default the young generation was collected
every few hundred deliveries, and the survivors of 1,000 connections
triggered full collections of about 130 ms each: with 1,000 clients flat
out, 1.31 s of 13.2 s of CPU was the collector (1.03 s in eight full
collections), and each full collection is a pause every client waits
through. At these thresholds the same run spent 0.13 s in 41 young
collections and none in full ones (measured with ``gc.callbacks``)."""


def tune_gc() -> None:
    """Collect what startup left, move the rest out of later collections
    (``gc.freeze``), and collect less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_gateway(config: GlobalConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    check_descriptors(config)
    tune_gc()
    GatewayServer(uvicorn_config(config)).run()


__all__ = [
    "GatewayServer",
    "check_descriptors",
    "http_protocol",
    "run_gateway",
    "tune_gc",
    "uvicorn_config",
    "ws_protocol",
]
