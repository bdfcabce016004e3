"""Resume after a gateway death, with Redis restarted and pub/sub killed, on a loaded machine.

The scenario of the "lost events after resume" report, with real processes:
two gateways, six WebSocket clients on one request (three per gateway), a
publisher using the SDK at a fixed rate; Redis (append-only file, so nothing
is lost) is restarted after a quarter of the events; then one gateway is
SIGKILLed and its three clients reconnect to the other with
``?request_id=R&after_seq=N`` (N = the last seq each had); then Redis kills
every pub/sub connection (``CLIENT KILL TYPE pubsub``). Busy-loop processes
keep every core busy meanwhile, because the lost events were seen on a heavily
loaded machine.

Every client must end with exactly ``1..total``: a resumed one with
``N+1..total`` after its ``after_seq``, each once, in order. With persistence
and no trimming nothing justifies a ``resync_required`` here, so any resync,
any error frame, any gap and any duplicate fails the run, with a diagnosis
naming the client, the missing seqs, when they were published relative to the
restart, the kill and the reconnect, and the frames it got around the hole.

``RELAY_STRESS_RUNS`` (default 2) sets how many independent runs are made;
``RELAY_STRESS_LOAD`` the number of busy-loop processes (default: one per
core, 0 for none); ``RELAY_STRESS_EVENTS`` and ``RELAY_STRESS_RATE`` the
stream (default 1,200 events at 400/s: the report's 3,000 at 300/s,
compressed so a run stays well under 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.orchestrator.client import Published, RelayClient
from tests.support import CpuLoad, Gateway, RedisServer, WsClient, eventually, start_gateways

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("RELAY_STRESS_RUNS", "2"))
LOAD = int(os.environ.get("RELAY_STRESS_LOAD", str(os.cpu_count() or 1)))
# 3,000 events at 300/s in the report; compressed so that a run stays well
# under 30 s on a loaded 2-core machine, with the same order of operations.
TOTAL = int(os.environ.get("RELAY_STRESS_EVENTS", "1200"))
RATE = float(os.environ.get("RELAY_STRESS_RATE", "400"))
CLIENTS_PER_GATEWAY = 3


AGENT = str(uuid.uuid4())


def delta(i: int) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": AGENT, "text": f"e{i}"}


def is_event(frame: dict[str, Any], rid: str) -> bool:
    return "seq" in frame and "ts" in frame and frame.get("request_id") == rid


def seqs(frames: list[dict[str, Any]], rid: str) -> list[int]:
    return [f["seq"] for f in frames if is_event(f, rid)]


def ranges(values: list[int]) -> str:
    """``[3, 4, 5, 9]`` as ``"3-5, 9"``."""
    out: list[str] = []
    start = prev = None
    for v in sorted(values):
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if start != prev else str(start))
        start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


@dataclass
class Timeline:
    """Moments of the run, in ``time.monotonic()`` seconds."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def describe(self, at: float) -> str:
        """``at`` relative to every mark: "+0.012s after redis back, -0.300s before kill"."""
        parts = []
        for name, t in self.marks.items():
            if name == "start":
                continue
            parts.append(f"{at - t:+.3f}s vs {name}")
        return ", ".join(parts)


@dataclass
class Publisher:
    """Publishes ``total`` events to one request at ``rate``/s through the SDK."""

    url: str
    rid: str
    total: int
    rate: float
    published: list[Published] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    """Monotonic time each publish returned (index = seq - 1)."""
    task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.run(), name="stress-publisher")
        return self.task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with RelayClient.from_url(self.url, publish_retry_seconds=30) as pub:
            start = loop.time()
            for i in range(self.total):
                ahead = start + i / self.rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                self.published.append(await pub.publish_many(self.rid, [delta(i)]))
                self.at.append(time.monotonic())

    async def reach(self, count: int) -> None:
        """Wait for ``count`` publishes; a publisher that failed raises its error here."""
        task = self.task
        assert task is not None
        await eventually(
            lambda: len(self.published) >= count or task.done(), 30, f"{count} publishes"
        )
        if len(self.published) < count:
            await task  # raises what stopped it
            raise AssertionError(f"publisher ended after {len(self.published)} events")


@dataclass
class Watcher:
    """One of the six clients: its frames before a kill and, if resumed, after."""

    name: str
    before: WsClient
    after: WsClient | None = None
    after_seq: int | None = None

    @property
    def current(self) -> WsClient:
        return self.after or self.before


def condensed(frame: dict[str, Any], rid: str) -> str:
    if is_event(frame, rid):
        return f"event seq={frame['seq']}"
    return json.dumps(frame, separators=(",", ":"))


def around(frames: list[dict[str, Any]], rid: str, seq: int, width: int = 3) -> str:
    """The frames around where ``seq`` should have been (after the last event below it)."""
    pos = 0
    for i, f in enumerate(frames):
        if is_event(f, rid) and f["seq"] < seq:
            pos = i + 1
    lo, hi = max(0, pos - width), min(len(frames), pos + width)
    lines = [f"      [{i}] {condensed(frames[i], rid)}" for i in range(lo, hi)]
    return "\n".join(lines) or "      (no frames)"


def check_stream(
    name: str,
    frames: list[dict[str, Any]],
    rid: str,
    first: int,
    last: int,
    pub: Publisher,
    timeline: Timeline,
) -> list[str]:
    """Problems with ``frames`` as the stream ``first..last`` of ``rid``: empty if exact."""
    got = seqs(frames, rid)
    expected = list(range(first, last + 1))
    controls = [f for f in frames if not is_event(f, rid)]
    # ``lagged`` is not on the list: it is followed by a refill from history, so
    # the seqs show whether it cost anything.
    bad_controls = [f for f in controls if f.get("type") in ("error", "resync_required")]
    if got == expected and not bad_controls:
        return []
    lines = [
        f"{name}: expected seqs {first}..{last} ({len(expected)}), got {len(got)} events"
        + (f" ({got[0]}..{got[-1]})" if got else "")
    ]
    have = set(got)
    missing = [s for s in expected if s not in have]
    if missing:
        lines.append(f"  missing {len(missing)}: {ranges(missing)}")
        for hole in ranges(missing).split(", ")[:5]:
            low = int(hole.split("-")[0])
            if 0 < low <= len(pub.at):
                lines.append(f"    seq {low} was published {timeline.describe(pub.at[low - 1])}")
            lines.append(f"    frames around seq {low}:\n{around(frames, rid, low)}")
    dups = sorted({s for s in got if got.count(s) > 1})
    if dups:
        lines.append(f"  duplicates: {ranges(dups)}")
    extra = sorted({s for s in got if s < first or s > last})
    if extra:
        lines.append(f"  outside {first}..{last}: {ranges(extra)}")
    inversions = [(a, b) for a, b in itertools.pairwise(got) if b < a]
    if inversions:
        lines.append(f"  out of order (first 5): {inversions[:5]}")
    for f in bad_controls:
        idx = frames.index(f)
        before = seqs(frames[:idx], rid)
        lines.append(
            f"  frame [{idx}] after seq {before[-1] if before else None}: {condensed(f, rid)}"
        )
    return lines


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def two_gateways(tmp_path: Path, aof_redis: RedisServer) -> Iterator[list[Gateway]]:
    gws = [
        Gateway(aof_redis.url, tmp_path / f"gw-{n}.log", {"RELAY_LOG_LEVEL": "warning"})
        for n in "AB"
    ]
    try:
        start_gateways(gws)
        yield gws
    finally:
        for gw in gws:
            gw.stop()


@contextlib.asynccontextmanager
async def six_clients(gws: list[Gateway], rid: str) -> AsyncIterator[list[Watcher]]:
    watchers: list[Watcher] = []
    try:
        for g, gw in enumerate(gws):
            for n in range(CLIENTS_PER_GATEWAY):
                ws = WsClient(f"{gw.ws_url}?request_id={rid}&after_seq=0")
                watchers.append(Watcher(f"gateway {'AB'[g]} client {n}", ws))
        # Concurrently, as browsers of one request arrive: the gateways see
        # overlapping subscriptions, as they do in production.
        await asyncio.gather(*(w.before.__aenter__() for w in watchers))
        for w in watchers:
            await w.before.wait_for(lambda c: bool(c.of_type("subscribed")), 15)
        yield watchers
    finally:
        for w in watchers:
            await w.before.close()
            if w.after is not None:
                await w.after.close()


@pytest.mark.parametrize("run", range(RUNS))
async def test_resumed_clients_lose_nothing_under_stress(
    run: int, aof_redis: RedisServer, two_gateways: list[Gateway]
) -> None:
    survivor, victim = two_gateways
    rid = str(uuid.uuid4())
    pub = Publisher(aof_redis.url, rid, TOTAL, RATE)
    timeline = Timeline()
    with CpuLoad(LOAD, seconds=60):
        async with six_clients(two_gateways, rid) as watchers:
            moved = watchers[CLIENTS_PER_GATEWAY:]
            timeline.mark("start")
            publisher = pub.start()
            try:
                await pub.reach(TOTAL // 4)
                timeline.mark("redis restart")
                await asyncio.to_thread(aof_redis.restart, 0.1)
                timeline.mark("redis back")
                # Every client has seen an event published after the restart:
                # both gateways came back before the kill.
                after_restart = len(pub.published) + 1
                await eventually(
                    lambda: all(
                        max(seqs(w.before.frames, rid), default=0) >= after_restart
                        for w in watchers
                    ),
                    15,
                    "every client past the restart",
                )

                timeline.mark("kill")
                victim.stop(signal.SIGKILL)
                for w in moved:
                    await asyncio.wait_for(w.before.closed.wait(), 10)
                for w in moved:
                    w.after_seq = max(seqs(w.before.frames, rid), default=0)
                    w.after = WsClient(
                        f"{survivor.ws_url}?request_id={rid}&after_seq={w.after_seq}"
                    )
                timeline.mark("reconnect")
                # All at once, as the clients of a dead gateway do.
                await asyncio.gather(*(w.current.__aenter__() for w in moved))
                await eventually(
                    lambda: all(
                        w.current.of_type("subscribed") or w.current.of_type("error") for w in moved
                    ),
                    15,
                    "a reply to every resume",
                )
                timeline.mark("pubsub kill")
                await asyncio.to_thread(aof_redis.command, "CLIENT", "KILL", "TYPE", "pubsub")
                await asyncio.wait_for(publisher, 60)
                timeline.mark("last publish")
            finally:
                if not publisher.done():
                    publisher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await publisher

            assert [p.last_seq for p in pub.published] == list(range(1, TOTAL + 1))
            assert len({p.epoch for p in pub.published}) == 1, "Redis lost the stream"
            with contextlib.suppress(TimeoutError):
                await eventually(
                    lambda: all(TOTAL in seqs(w.current.frames, rid) for w in watchers),
                    20,
                    "every client at the last seq",
                )

            problems: list[str] = []
            for w in watchers:
                if w.after is None:
                    problems += check_stream(w.name, w.before.frames, rid, 1, TOTAL, pub, timeline)
                    continue
                assert w.after_seq is not None
                problems += check_stream(
                    f"{w.name} before the kill", w.before.frames, rid, 1, w.after_seq, pub,
                    timeline,
                )  # fmt: skip
                problems += check_stream(
                    f"{w.name} resumed on gateway A with after_seq={w.after_seq}",
                    w.after.frames, rid, w.after_seq + 1, TOTAL, pub, timeline,
                )  # fmt: skip
    if problems:
        marks = ", ".join(
            f"{k} at {v - timeline.marks['start']:.3f}s" for k, v in timeline.marks.items()
        )
        report = "\n".join([f"run {run}: {marks}", *problems])
        pytest.fail(report, pytrace=False)
