"""The measured phases: fixed rate, flat out, idle connections, backlog resume.

Each phase is measured from the kernel's accounting of the server process
(CPU time and RSS from ``/proc``) over the window from the first publish to
the last client having the last event; the load clients' CPU over the same
window is recorded next to it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.fanout.load import NODE_DIR, Clients, Publisher
from benchmarks.fanout.systems import System, cpu_seconds, rss_bytes
from relay.wire.keys import Keys


@dataclass
class Result:
    system: str
    phase: str  # rate | flat | idle | resume
    clients: int
    size: int
    deliveries: int = 0
    seconds: float = 0.0
    per_s: float = 0.0
    cpu_us: float = 0.0
    """Server CPU per delivery, µs."""
    server_cpu_pct: float = 0.0
    client_cpu_pct_max: float = 0.0
    """The busiest load client process, % of one core."""
    client_procs: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    rss_mb: float = 0.0
    rss_per_conn_kb: float = 0.0
    others: int = 0
    """Frames that were not events (relay: lagged/resync frames mean drops)."""
    failed: int = 0
    round: int = 0

    def row(self) -> dict[str, Any]:
        return asdict(self)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def procs_for(clients: int) -> int:
    return 2 if clients <= 500 else 4


async def connect(system: System, clients: int) -> tuple[Clients, str]:
    rid = str(uuid.uuid4())
    channel = Keys("default").request_channel(rid)
    conns = await Clients(
        system.url(rid, channel), clients, procs_for(clients), sse=system.transport == "sse"
    ).start()
    return conns, rid


async def rate_phase(
    system: System,
    conns: Clients,
    rid: str,
    pub: Publisher,
    *,
    target: float,
    seconds: float,
    size: int,
) -> Result:
    """``target`` deliveries/s (events/s = target / clients) for about ``seconds``."""
    n = conns.ready
    rate = target / n
    count = max(5, round(rate * seconds))
    await conns.expect(count, count, latency=True)
    return await _measure(system, conns, "rate", size, count, pub.paced(rid, count, rate, size))


async def flat_phase(
    system: System, conns: Clients, rid: str, pub: Publisher, *, deliveries: int, size: int
) -> Result:
    """As fast as the system goes: bursts of ``step`` events, two bursts in flight
    (under relay's queue bounds, so that the figure is delivery, not shedding)."""
    n = conns.ready
    step = max(4, min(256, int(1.5 * 2**20) // size))
    count = max(2 * step, round(deliveries / n / step) * step)
    await conns.expect(count, step, latency=False)

    async def drive() -> None:
        for k in range(count // step):
            if k >= 2:
                await conns.reached((k - 1) * step)
            await pub.burst(rid, step, size)

    return await _measure(system, conns, "flat", size, count, drive())


async def _measure(
    system: System, conns: Clients, phase: str, size: int, count: int, drive: Any
) -> Result:
    assert system.process is not None
    pid = system.process.pid
    cpu0, ccpu0, t0 = cpu_seconds(pid), conns.cpu_each(), time.monotonic()
    waiter = asyncio.create_task(conns.done())
    await drive
    done = await asyncio.wait_for(waiter, 300)
    t1 = time.monotonic()
    cpu1, ccpu1 = cpu_seconds(pid), conns.cpu_each()
    span = max(1e-6, t1 - t0)
    deliveries = count * conns.ready
    lat = done.latencies_ms
    busiest = max(b - a for a, b in zip(ccpu0, ccpu1, strict=True))
    return Result(
        system=system.key,
        phase=phase,
        clients=conns.count,
        size=size,
        deliveries=deliveries,
        seconds=span,
        per_s=deliveries / span,
        cpu_us=(cpu1 - cpu0) / deliveries * 1e6,
        server_cpu_pct=(cpu1 - cpu0) / span * 100,
        client_cpu_pct_max=busiest / span * 100,
        client_procs=len(conns.procs),
        p50_ms=statistics.median(lat) if lat else float("nan"),
        p99_ms=pct(lat, 0.99),
        max_ms=max(lat) if lat else float("nan"),
        rss_mb=rss_bytes(pid) / 2**20,
        others=done.others,
        failed=conns.failed,
    )


async def idle_phase(system: System, clients: int, settle: float = 2.0) -> Result:
    """RSS of the process before and with ``clients`` idle connections."""
    assert system.process is not None
    pid = system.process.pid
    before = rss_bytes(pid)
    conns, _ = await connect(system, clients)
    try:
        await asyncio.sleep(settle)  # a measuring window: let lazy allocations happen
        after = rss_bytes(pid)
    finally:
        await conns.close()
    return Result(
        system=system.key,
        phase="idle",
        clients=conns.count,
        size=0,
        rss_mb=after / 2**20,
        rss_per_conn_kb=(after - before) / max(1, conns.ready) / 1024,
        failed=conns.failed,
    )


async def quiet(pid: int, cap: float = 30.0, window: float = 0.5) -> None:
    """Wait (at most ``cap`` seconds) until ``pid`` uses under 5% of a core over
    ``window``: a phase right after the idle one otherwise overlapped the
    server closing 10,000 connections, and a resume measured 1.4 s of that."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        used = cpu_seconds(pid)
        await asyncio.sleep(window)
        if cpu_seconds(pid) - used < 0.05 * window:
            return


async def resume_phase(system: System, pub: Publisher, events: int, size: int) -> Result:
    """Publish ``events`` to a request nobody watches, then time one client's resume
    with ``after_seq=0`` (connect, handshake, every event received)."""
    assert system.process is not None
    await quiet(system.process.pid)
    rid = str(uuid.uuid4())
    for start in range(0, events, 500):
        await pub.burst(rid, min(500, events - start), size)
    url = system.url(rid, "") + "&after_seq=0"
    node = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "client.js"),
        url,
        "1",
        "--expect",
        str(events),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert node.stdout is not None
    ms = float("nan")
    try:
        while True:
            line = await asyncio.wait_for(node.stdout.readline(), 60)
            if not line:
                break
            if b"resumed" in line:
                ms = float(json.loads(line)["ms"])
                break
    finally:
        if node.returncode is None:
            node.kill()
        await node.wait()
    return Result(
        system=system.key, phase="resume", clients=1, size=size, deliveries=events, max_ms=ms
    )
