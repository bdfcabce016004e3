"""Overload benchmark: thousands of idle firehose clients, a 1 KB event stream, a cancel burst.

Starts its own redis-server on a free port and one gateway process (default
probe settings), then, for each client mode:

* opens ``--connections`` WebSocket connections without ``request_id`` (the
  tenant-wide stream: each receives every event), spread over ``--workers``
  client processes so the load client is not the bottleneck. ``never``: they
  never read (small receive buffers, so back-pressure reaches the gateway
  quickly); ``slow``: they read one frame every 50 ms; ``normal``: they read
  everything; reading clients check every seq (gaps, duplicates, whether
  they got the whole stream);
* publishes ``--events`` events of ``--size`` bytes at ``--rate``/s through
  the SDK, and meanwhile measures:

  - the ping round trip of another, well-behaved client (subscribed to a
    request of its own, so its pongs queue behind no events), every 100 ms;
  - the time a new client needs to be served: TCP + WebSocket handshake +
    first ``pong``, a new client every 500 ms;
  - ``/readyz`` every 500 ms: status, ``probe_age_s``, ``reconnects``;
  - the gateway's RSS;

* keeps measuring after the last event until the gateway has sent every
  client every event (at most ``--settle`` seconds), then fires
  ``--cancels`` concurrent cancels over REST (``POST /api/v1/agents/{id}/cancel``)
  and as many ``cancel_agent`` WebSocket commands, while the idle clients are
  still connected;
* reads ``/metrics`` before and after: probe failures, pub/sub reconnects,
  connections shed by the overload policy (closed 1013), events dropped
  from full client queues, events sent, connections.

It prints figures and asserts nothing. Every loop is bounded in count and
time, and everything listens on and connects to 127.0.0.1 only.

Run: ``python benchmarks/overload.py`` (needs ``redis-server`` on PATH);
``--modes never,normal`` is the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, http_get, metric_value

HOST = "127.0.0.1"
PING_EVERY = 0.1
NEW_CLIENT_EVERY = 0.5
READYZ_EVERY = 0.5
REQUEST_TIMEOUT = 15.0
"""A ping, a new client or a cancel not answered within this long counts as timed out."""


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft fd limit towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(value: float) -> str:
    """Seconds as milliseconds; infinity is what never came (see :meth:`Samples.rtts`)."""
    if value != value:
        return "n/a"
    if value == float("inf"):
        return "never"
    return f"{value * 1000:.1f} ms"


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (any labels), counters with or without ``_total``."""
    total = 0.0
    names = {name, name + "_total"}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0] in names:
            total += float(value)
    return total


# ---------------------------------------------------------------- load worker


def frame_seq(message: str | bytes) -> int | None:
    """The ``seq`` of an event frame without decoding its JSON (None: not an event).

    The gateway appends ``request_id``, ``seq`` and ``ts`` to every event; a
    substring search keeps 2,000 reading clients from costing a JSON parse per
    frame, which would load the machine the gateway runs on.
    """
    text = message if isinstance(message, str) else message.decode()
    at = text.rfind('"seq":')
    if at < 0 or '"ts":' not in text[at:]:
        return None
    digits = text[at + 6 :].partition(",")[0]
    return int(digits) if digits.isdigit() else None


async def _worker(url: str, count: int, mode: str, max_seconds: float, expect: int) -> None:
    """One client process: ``count`` firehose connections in ``mode`` until told to stop.

    Reading clients check every event's seq: gaps (events the gateway never
    sent them) and duplicates are counted, as are connections that got all
    ``expect`` events.
    """
    raise_fd_limit(count + 256)
    loop = asyncio.get_running_loop()
    opened: list[Any] = []
    failures: Counter[str] = Counter()
    gate = asyncio.Semaphore(64)

    async def open_one() -> None:
        async with gate:
            sock = None
            if mode == "never":
                # A small receive buffer: the kernel absorbs little, so the
                # gateway's own send path and queues take the back-pressure.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (HOST, urllib.parse.urlsplit(url).port or 80))
                except OSError as exc:
                    sock.close()
                    failures[type(exc).__name__] += 1
                    return
            try:
                ws = await websockets.connect(
                    url,
                    sock=sock,
                    open_timeout=60,
                    ping_interval=None,  # idle clients: only the gateway pings
                    max_queue=1 if mode == "never" else 64,
                    max_size=None,
                    compression=None,
                )
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                if sock is not None:
                    sock.close()
                failures[type(exc).__name__] += 1
                return
            opened.append(ws)

    await asyncio.gather(*(open_one() for _ in range(count)))
    print(json.dumps({"ready": len(opened), "failed": dict(failures)}), flush=True)

    stats: Counter[str] = Counter()

    lasts = [0] * len(opened)

    async def read(i: int, ws: Any) -> None:
        last = 0
        try:
            async for message in ws:
                seq = frame_seq(message)
                if seq is None:
                    kind = message[:40].partition('"type":"')[2].partition('"')[0]
                    stats[f"frames {kind}"] += 1
                    continue
                stats["received"] += 1
                if seq > last + 1:
                    stats["missing"] += seq - last - 1
                    stats["gaps"] += 1
                elif seq <= last:
                    stats["duplicates"] += 1
                last = lasts[i] = max(last, seq)
                if mode == "slow":
                    await asyncio.sleep(0.05)
        except websockets.ConnectionClosed:
            stats["closed_by_server"] += 1

    readers = (
        [] if mode == "never" else [asyncio.create_task(read(i, ws)) for i, ws in enumerate(opened)]
    )
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    loop.remove_reader(sys.stdin.fileno())
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for ws in opened:
        ws.transport.abort()  # a client that never read cannot close politely
    if mode != "never" and lasts:
        stats["connections_with_all_events"] = sum(1 for last in lasts if last >= expect)
        stats["lowest_last_seq"] = min(lasts)
    print(json.dumps(dict(stats)), flush=True)


class Workers:
    """The client processes holding the idle connections."""

    def __init__(
        self, url: str, total: int, processes: int, mode: str, max_seconds: float, expect: int
    ):
        share = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    url,
                    str(n),
                    mode,
                    str(max_seconds),
                    str(expect),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in share
            if n > 0
        ]

    def _line(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        """The worker's next report line, or {} when none comes within ``timeout``."""
        assert proc.stdout is not None
        # A worker writes one line and then waits for us, so nothing is left
        # in the pipe's buffer behind it and select() on the fd is reliable.
        readable, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if readable else ""
        return json.loads(line) if line.strip() else {}

    def ready(self, timeout: float) -> tuple[int, Counter[str]]:
        """Block until every worker has opened its connections: (opened, failures)."""
        opened, failed = 0, Counter[str]()
        for proc in self.procs:
            report = self._line(proc, timeout)
            opened += report.get("ready", 0)
            failed.update(report.get("failed", {}))
        return opened, failed

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
        lowest: list[int] = []
        for proc in self.procs:
            report = self._line(proc, timeout)  # also after it exited: the pipe has it
            if "lowest_last_seq" in report:
                lowest.append(report.pop("lowest_last_seq"))
            totals.update(report)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if lowest:
            totals["lowest_last_seq"] = min(lowest)
        return dict(totals)


# ---------------------------------------------------------------- measurements


async def http_request(
    port: int, method: str, path: str, body: bytes = b"", timeout: float = 2.0
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh loopback connection: (status, body).

    Raw asyncio rather than urllib in threads, so hundreds can be in flight
    without a thread each; raises TimeoutError after ``timeout``.
    """
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(head + body)
            await writer.drain()
            raw = b""
            for _ in range(1024):  # a reply of at most 1024 reads
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                raw += chunk
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not raw.startswith(b"HTTP/"):
        return 0, raw
    return int(raw.split(b" ", 2)[1]), raw.partition(b"\r\n\r\n")[2]


@dataclass
class Samples:
    """What the monitors saw while the load ran; times are ``time.monotonic()``."""

    pings: list[tuple[float, float | None]] = field(default_factory=list)
    """(sent at, round trip or None when never answered)."""
    new_clients: list[tuple[float, float | None, str]] = field(default_factory=list)
    """(started at, connect + first pong or None, outcome)."""
    readyz: list[tuple[float, str]] = field(default_factory=list)
    """(asked at, status: "200", "503", "timeout", ...)."""
    pinger_drops: Counter[str] = field(default_factory=Counter)
    """Times the well-behaved client's connection was lost, by error."""
    probe_age_max: float = 0.0
    reconnects: int = 0
    rss_max: float = 0.0
    rss_first: float = 0.0

    def rtts(self) -> list[float]:
        """Every ping's round trip, infinite when never answered: leaving those
        out would report the few pings that got through as the typical one."""
        return [rtt if rtt is not None else float("inf") for _, rtt in self.pings]

    def served(self) -> list[float]:
        """Every new client's time to be served, infinite when it failed or timed out."""
        return [t if t is not None else float("inf") for _, t, _ in self.new_clients]


async def pinger(url: str, samples: Samples, stop: asyncio.Event) -> None:
    """A well-behaved client: reads everything, sends a ping every 100 ms whether
    or not the previous one was answered, matches pongs by ``command_id``.

    Like a browser it sends no keepalive pings of its own; when the gateway
    drops it anyway it reconnects (at most 20 times) and the drop is counted.
    """
    n = 0
    for _ in range(20):
        if stop.is_set():
            return
        try:
            n = await _ping_session(url, samples, stop, n)
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            samples.pinger_drops[type(exc).__name__] += 1


async def _ping_session(url: str, samples: Samples, stop: asyncio.Event, n: int) -> int:
    """One connection of :func:`pinger`; returns the next ping number."""
    pending: dict[str, float] = {}
    try:
        async with websockets.connect(
            url, max_size=None, compression=None, open_timeout=REQUEST_TIMEOUT, ping_interval=None
        ) as ws:
            answered = asyncio.Event()

            async def read() -> None:
                async for message in ws:
                    frame = json.loads(message)
                    sent = pending.pop(str(frame.get("command_id")), None)
                    if frame.get("type") == "pong" and sent is not None:
                        samples.pings.append((sent, time.monotonic() - sent))
                    if stop.is_set() and not pending:
                        answered.set()

            reader = asyncio.create_task(read())
            try:
                for _ in range(100_000):
                    if stop.is_set() or reader.done():
                        break
                    pending[str(n)] = time.monotonic()
                    await ws.send(json.dumps({"type": "ping", "command_id": str(n)}))
                    n += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), PING_EVERY)
                # Give the last ones their full chance to come back.
                if pending and not reader.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(answered.wait(), REQUEST_TIMEOUT)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if not stop.is_set():
                samples.pinger_drops[f"closed {ws.close_code}"] += 1
    finally:
        samples.pings.extend((sent, None) for sent in pending.values())
    return n


async def new_client(url: str, samples: Samples) -> None:
    """Connect, ping, wait for the pong: the time a new client needs to be served."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with websockets.connect(
                url,
                max_size=None,
                compression=None,
                open_timeout=REQUEST_TIMEOUT,
                ping_interval=None,
            ) as ws:
                await ws.send(json.dumps({"type": "ping", "command_id": "first"}))
                async for message in ws:
                    if json.loads(message).get("type") == "pong":
                        break
        samples.new_clients.append((began, time.monotonic() - began, "ok"))
    except TimeoutError:
        samples.new_clients.append((began, None, "timeout"))
    except (OSError, websockets.WebSocketException) as exc:
        samples.new_clients.append((began, None, type(exc).__name__))


async def new_clients(url: str, samples: Samples, stop: asyncio.Event) -> None:
    """A new client every 500 ms (each on its own; a slow one does not delay the next)."""
    tasks: list[asyncio.Task[None]] = []
    for _ in range(1000):
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(new_client(url, samples)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), NEW_CLIENT_EVERY)
    await asyncio.gather(*tasks)


async def readyz_once(gw: Gateway, samples: Samples) -> None:
    asked = time.monotonic()
    try:
        status, body = await http_request(gw.port, "GET", "/readyz", timeout=2.0)
    except TimeoutError:
        samples.readyz.append((asked, "timeout"))
        return
    except OSError as exc:
        samples.readyz.append((asked, type(exc).__name__))
        return
    samples.readyz.append((asked, str(status)))
    with contextlib.suppress(ValueError):
        facts = json.loads(body)
        samples.probe_age_max = max(samples.probe_age_max, float(facts.get("probe_age_s", 0)))
        samples.reconnects = max(samples.reconnects, int(facts.get("reconnects", 0)))


async def readyz_poller(gw: Gateway, samples: Samples, stop: asyncio.Event) -> None:
    """``/readyz`` every 500 ms (2 s timeout each, overlapping) and the gateway's RSS."""
    assert gw.proc is not None
    proc = psutil.Process(gw.proc.pid)
    samples.rss_first = proc.memory_info().rss / 2**20
    tasks: list[asyncio.Task[None]] = []
    for _ in range(10_000):
        if stop.is_set():
            break
        samples.rss_max = max(samples.rss_max, proc.memory_info().rss / 2**20)
        tasks.append(asyncio.create_task(readyz_once(gw, samples)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), READYZ_EVERY)
    await asyncio.gather(*tasks)


async def publish(url: str, rid: str, events: int, rate: float, size: int) -> float:
    """Publish ``events`` deltas of about ``size`` bytes at ``rate``/s; returns seconds taken."""
    agent = str(uuid.uuid4())
    text = "x" * max(1, size - 167)  # the rest of the frame is about 167 bytes
    loop = asyncio.get_running_loop()
    async with RelayClient.from_url(url) as pub:
        start = loop.time()
        for i in range(events):
            ahead = start + i / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await pub.publish_text_deltas(rid, agent, [text])
        return loop.time() - start


async def wait_drained(gw: Gateway, expected: float, before: float, cap: float) -> float | None:
    """Seconds until the gateway has sent ``expected`` event frames since ``before``
    (read from /metrics once a second), or None when it has not within ``cap``."""
    began = time.monotonic()
    while time.monotonic() - began < cap:
        with contextlib.suppress(TimeoutError, OSError):
            _, body = await http_request(gw.port, "GET", "/metrics", timeout=2.0)
            sent = (metric_value(body.decode(), "relay_events_sent_total") or 0.0) - before
            if sent >= expected:
                return time.monotonic() - began
        await asyncio.sleep(1.0)
    return None


# ---------------------------------------------------------------- cancels


@dataclass
class Burst:
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)


async def rest_cancel(port: int, burst: Burst) -> None:
    body = json.dumps({"reason": "overload benchmark"}).encode()
    began = time.monotonic()
    try:
        status, answer = await http_request(
            port, "POST", f"/api/v1/agents/{uuid.uuid4()}/cancel", body, REQUEST_TIMEOUT
        )
    except TimeoutError:
        burst.failures["timeout"] += 1
        return
    except OSError as exc:
        burst.failures[type(exc).__name__] += 1
        return
    burst.latency.append(time.monotonic() - began)
    if status == 202:
        burst.ok += 1
        return
    try:
        message = json.loads(answer).get("message", "")
    except ValueError:
        message = answer[:60].decode(errors="replace")
    burst.failures[f"{status} {message}"[:80]] += 1


@dataclass
class Starter:
    """Releases every WebSocket cancel at once, when all connections are subscribed."""

    expected: int
    ready: int = 0
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self) -> None:
        self.ready += 1
        if self.ready >= self.expected:
            self.go.set()


async def ws_cancel(ws: Any, start: Starter, burst: Burst) -> None:
    """One cancel_agent on an open connection, sent when every connection is ready."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async for message in ws:
                if json.loads(message).get("type") == "subscribed":
                    break
    except (TimeoutError, websockets.ConnectionClosed):
        pass  # counted below: its cancel is still sent
    start.arrived()
    await start.go.wait()
    began = time.monotonic()
    try:
        await ws.send(json.dumps({"type": "cancel_agent", "agent_id": str(uuid.uuid4())}))
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "ack":
                    burst.ok += 1
                    break
                if frame.get("type") == "error":
                    burst.failures[str(frame.get("message"))[:80]] += 1
                    break
        burst.latency.append(time.monotonic() - began)
    except TimeoutError:
        burst.failures["timeout"] += 1
    except websockets.ConnectionClosed:
        burst.failures["connection closed"] += 1


async def cancel_bursts(gw: Gateway, count: int) -> tuple[Burst, Burst]:
    """``count`` concurrent REST cancels, then ``count`` concurrent WebSocket ones."""
    rest, wsb = Burst(), Burst()
    await asyncio.gather(*(rest_cancel(gw.port, rest) for _ in range(count)))
    # A connection runs its commands one after another: concurrent cancels
    # come from as many connections, opened first, then all sent at once.
    url = f"{gw.ws_url}?request_id={uuid.uuid4()}"
    async with contextlib.AsyncExitStack() as stack:
        conns = []
        for _ in range(count):
            try:
                conns.append(
                    await stack.enter_async_context(
                        websockets.connect(
                            url, compression=None, open_timeout=REQUEST_TIMEOUT, ping_interval=None
                        )
                    )
                )
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                wsb.failures[f"connect: {type(exc).__name__}"] += 1
        start = Starter(len(conns))
        await asyncio.gather(*(ws_cancel(ws, start, wsb) for ws in conns))
    return rest, wsb


# ---------------------------------------------------------------- one mode


def since(samples: list[tuple[float, str]], origin: float) -> str:
    """The span of the failed samples, relative to ``origin`` (the first publish)."""
    bad = [t for t, status in samples if status != "200"]
    if not bad:
        return ""
    return f", failing from {min(bad) - origin:+.1f}s to {max(bad) - origin:+.1f}s"


async def run_mode(args: argparse.Namespace, mode: str, workdir: Path) -> dict[str, Any]:
    redis = RedisServer(workdir / f"redis-{mode}").start()
    gw = Gateway(
        redis.url,
        workdir / f"gateway-{mode}.log",
        {
            # The shipped defaults, not the tests' fast probe.
            "RELAY_GATEWAY_PROBE_INTERVAL": "1.0",
            "RELAY_GATEWAY_PROBE_TIMEOUT": "2.0",
            "RELAY_LOG_LEVEL": "warning",
            # Every load client comes from 127.0.0.1, one "subject" to the
            # per-subject limits: lift those (and the cancel budget), or the
            # benchmark measures the limits instead of the overload.
            "RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": str(args.connections + 1000),
            "RELAY_LIMITS_CANCELS_PER_MINUTE": str(10 * args.cancels + 100),
        },
    ).start()
    result: dict[str, Any] = {"mode": mode}
    workers: Workers | None = None
    try:
        # Baseline: the well-behaved client's ping on an idle gateway.
        idle = Samples()
        stop = asyncio.Event()
        own = f"{gw.ws_url}?request_id={uuid.uuid4()}"
        ping_task = asyncio.create_task(pinger(own, idle, stop))
        await asyncio.sleep(2.0)  # a benchmark's measuring window, not synchronisation
        stop.set()
        await ping_task
        result["idle_ping"] = idle.rtts()

        began = time.monotonic()
        workers = Workers(
            gw.ws_url, args.connections, args.workers, mode, args.max_seconds, args.events
        )
        opened, failed = await asyncio.to_thread(workers.ready, 180.0)
        result["connect_s"] = time.monotonic() - began
        result["opened"], result["open_failures"] = opened, failed
        before = (await asyncio.to_thread(http_get, gw.http + "/metrics", 10.0))[1].decode()
        sent_before = metric_value(before, "relay_events_sent_total") or 0.0

        samples = Samples()
        stop = asyncio.Event()
        monitors = [
            asyncio.create_task(pinger(f"{gw.ws_url}?request_id={uuid.uuid4()}", samples, stop)),
            asyncio.create_task(new_clients(gw.ws_url, samples, stop)),
            asyncio.create_task(readyz_poller(gw, samples, stop)),
        ]
        rid = str(uuid.uuid4())
        result["origin"] = time.monotonic()
        result["publish_s"] = await publish(redis.url, rid, args.events, args.rate, args.size)
        # Keep measuring until every connected client has been sent every event
        # (or the cap): how long the overload lasts, and how the gateway behaves.
        result["drain_s"] = await wait_drained(
            gw, float(args.events * opened), sent_before, args.settle
        )
        stop.set()
        await asyncio.gather(*monitors)
        result["window_s"] = time.monotonic() - result["origin"]
        result["samples"] = samples

        rest, wsb = await cancel_bursts(gw, args.cancels)
        result["rest"], result["ws"] = rest, wsb

        after = (await asyncio.to_thread(http_get, gw.http + "/metrics", 10.0))[1].decode()
        for name in (
            "relay_probe_failures_total",
            "relay_redis_reconnects_total",
            "relay_queue_drops_total",
            "relay_connections_shed_total",
            "relay_events_sent_total",
            "relay_bytes_sent_total",
            "relay_events_replayed_total",
            "relay_connections_opened_total",
        ):
            result[name] = (metric_value(after, name) or 0.0) - (metric_value(before, name) or 0.0)
        result["resyncs"] = metric_sum(after, "relay_resyncs") - metric_sum(before, "relay_resyncs")
        result["connections_end"] = metric_value(after, "relay_connections")
        assert gw.proc is not None
        result["rss_end"] = psutil.Process(gw.proc.pid).memory_info().rss / 2**20
        result["workers"] = await asyncio.to_thread(workers.stop)
        workers = None
    finally:
        if workers is not None:
            await asyncio.to_thread(workers.stop, 10.0)
        gw.stop()
        redis.stop()
    return result


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    s: Samples = r["samples"]
    origin: float = r["origin"]
    rest: Burst = r["rest"]
    wsb: Burst = r["ws"]
    rtts = s.rtts()
    lost = [t for t, rtt in s.pings if rtt is None]
    slow = [t for t, rtt in s.pings if rtt is None or rtt > 0.1]
    served = s.served()
    refused = Counter(outcome for _, t, outcome in s.new_clients if t is None)
    readyz = Counter(status for _, status in s.readyz)
    new_status = [(t, "200" if served_in is not None else o) for t, served_in, o in s.new_clients]
    failed = ", ".join(f"{k}: {v}" for k, v in r["open_failures"].items()) or "none"
    drain = f"{r['drain_s']:.1f}s" if r["drain_s"] is not None else f"not within {args.settle:g}s"
    nan = float("nan")
    inf = float("inf")
    answered = [r for r in rtts if r < inf]
    got_in = [t for t in served if t < inf]
    end = origin + r["publish_s"]
    ping_during = [rtt for (t, _), rtt in zip(s.pings, rtts, strict=True) if t <= end]
    new_during = [x for (t, _, _), x in zip(s.new_clients, served, strict=True) if t <= end]
    lines = [
        f"== mode {r['mode']!r}: {r['opened']}/{args.connections} idle firehose connections "
        f"opened in {r['connect_s']:.1f}s (failures: {failed})",
        f"  {args.events} x {args.size} B events at {args.rate:g}/s: published in "
        f"{r['publish_s']:.1f}s; every client sent every event {drain} after the last "
        f"publish; measured over {r['window_s']:.1f}s from the first publish",
        f"  idle gateway, ping RTT: p50 {ms(pct(r['idle_ping'], 0.5))}, "
        f"p99 {ms(pct(r['idle_ping'], 0.99))}",
        f"  whole window, another client's ping RTT: p50 {ms(pct(rtts, 0.5))}, "
        f"p99 {ms(pct(rtts, 0.99))}, max answered {ms(max(answered, default=nan))} "
        f"({len(s.pings)} pings, {sum(1 for r in rtts if REQUEST_TIMEOUT < r < inf)} "
        "answered after "
        f"more than {REQUEST_TIMEOUT:g}s, {len(lost)} never, "
        f"connection lost: {dict(s.pinger_drops) or 'never'}"
        + (
            f"; slower than 100 ms from {min(slow) - origin:+.1f}s to {max(slow) - origin:+.1f}s)"
            if slow
            else ")"
        ),
        f"  while the events were published ({r['publish_s']:.0f}s): ping p50 "
        f"{ms(pct(ping_during, 0.5))}, p99 {ms(pct(ping_during, 0.99))}; new client p50 "
        f"{ms(pct(new_during, 0.5))}, p99 {ms(pct(new_during, 0.99))} "
        f"({sum(1 for t in new_during if t < inf)}/{len(new_during)} served)",
        f"  whole window, new client (connect + first pong): p50 {ms(pct(served, 0.5))}, "
        f"p99 {ms(pct(served, 0.99))}, max served {ms(max(got_in, default=nan))} "
        f"({sum(1 for t in served if t < inf)}/{len(s.new_clients)} served, "
        f"failed: {dict(refused) or 'none'}"
        f"{since(new_status, origin)})",
        f"  /readyz: {len(s.readyz) - readyz.get('200', 0)}/{len(s.readyz)} not 200 "
        f"({dict(readyz)}{since(s.readyz, origin)}); max probe_age_s {s.probe_age_max:.2f}, "
        f"reconnects {s.reconnects}",
        f"  /metrics: probe failures {r['relay_probe_failures_total']:.0f}, pub/sub reconnects "
        f"{r['relay_redis_reconnects_total']:.0f}, connections shed (closed 1013) "
        f"{r['relay_connections_shed_total']:.0f}, events dropped from full queues "
        f"{r['relay_queue_drops_total']:.0f}, events sent {r['relay_events_sent_total']:.0f}, "
        f"replayed {r['relay_events_replayed_total']:.0f} (average frame "
        f"{r['relay_bytes_sent_total'] / max(1.0, r['relay_events_sent_total']):.0f} B), "
        f"resyncs {r['resyncs']:.0f}, connections at the end {r['connections_end']:.0f}",
        f"  gateway RSS: {s.rss_first:.0f} MiB with the clients connected, max {s.rss_max:.0f} "
        f"MiB while measuring, {r['rss_end']:.0f} MiB at the end",
        f"  {args.cancels} concurrent REST cancels: {rest.ok} ok, "
        f"{sum(rest.failures.values())} failed {dict(rest.failures.most_common(3))}; "
        f"p50 {ms(pct(rest.latency, 0.5))}, p99 {ms(pct(rest.latency, 0.99))}",
        f"  {args.cancels} concurrent WebSocket cancel_agent: {wsb.ok} ok, "
        f"{sum(wsb.failures.values())} failed {dict(wsb.failures.most_common(3))}; "
        f"p50 {ms(pct(wsb.latency, 0.5))}, p99 {ms(pct(wsb.latency, 0.99))}",
        f"  load clients: {r['workers']}",
    ]
    print("\n".join(lines), flush=True)


async def main(args: argparse.Namespace) -> None:
    limit = raise_fd_limit(args.connections * 2 + 1024)
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
        f"fd limit {limit}; python {sys.version.split()[0]}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.logs) if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for mode in args.modes.split(","):
            result = await run_mode(args, mode, workdir)
            report(args, result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, count, mode, max_seconds, expect = sys.argv[2:7]
        asyncio.run(_worker(url, int(count), mode, float(max_seconds), int(expect)))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--modes", default="never,normal", help="never, slow, normal")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--size", type=int, default=1024, help="bytes per event frame")
    parser.add_argument(
        "--settle", type=float, default=90.0, help="measure at most this long after the events"
    )
    parser.add_argument("--cancels", type=int, default=500)
    parser.add_argument("--logs", help="keep the gateway and Redis logs in this directory")
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="load clients exit after this long"
    )
    args = parser.parse_args()
    for mode in args.modes.split(","):
        if mode not in ("never", "slow", "normal"):
            parser.error(f"--modes: unknown mode {mode!r} (never, slow, normal)")
    asyncio.run(main(args))
