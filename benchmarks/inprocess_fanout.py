"""In-process cost of the gateway's per-delivery hot path, without sockets or Redis.

Offers N envelopes to C connections' send queues, the way the hub does, and
lets each connection's ordered writer drain its queue to a socket stand-in
whose send does nothing. What is left is relay's own work per delivery:
queueing, seq ordering, metrics and the writer loop.

Wall-clock figures on a shared machine are noisy; run it under callgrind for
an instruction count that does not depend on the machine's load::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/inprocess_fanout.py --events 2000 --clients 10

and compare the ``Collected`` totals of two versions of the code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fakeredis

from relay.config import GlobalConfig
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.sendqueue import SendQueue
from relay.gateway.store import RequestStore
from relay.gateway.writer import OrderedWriter
from relay.wire.keys import Keys


class NullSocket:
    """Takes every frame at once, like a socket whose buffer always has room."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_text(self, text: str) -> None:
        self.sent += 1


async def run(events: int, clients: int) -> float:
    config = GlobalConfig()
    metrics = Metrics()
    store = RequestStore(fakeredis.FakeAsyncRedis(), Keys())
    rid = str(uuid.uuid4())
    frame = '{"type":"agent_text_delta","agent_id":"x","text":"' + "y" * 150 + '"}'
    envs = [
        Envelope(rid, seq, "e", "agent_text_delta", frame, nbytes=len(frame), ts=1)
        for seq in range(1, events + 1)
    ]
    sockets, queues, tasks = [], [], []
    for _ in range(clients):
        sock = NullSocket()
        queue = SendQueue(events + 1, 1 << 30, "drop_oldest", metrics)
        options: dict[str, Any] = {
            "wants": lambda r: True,
            "subscribed": lambda r: True,
            "runs": set(),
        }
        writer = OrderedWriter(sock, queue, store, config, metrics, **options)  # type: ignore[arg-type]
        sockets.append(sock)
        queues.append(queue)
        tasks.append(asyncio.create_task(writer.run()))
    await asyncio.sleep(0)
    started = time.perf_counter()
    batch = 50
    for i in range(0, events, batch):
        for env in envs[i : i + batch]:
            for queue in queues:
                queue.push_event(env)
        await asyncio.sleep(0)
    while any(s.sent < events for s in sockets):  # noqa: ASYNC110 - measuring, not waiting
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    elapsed = asyncio.run(run(args.events, args.clients))
    deliveries = args.events * args.clients
    print(
        f"{deliveries:,} deliveries in {elapsed:.3f}s: "
        f"{elapsed / deliveries * 1e6:.2f} us per delivery (wall clock, in process)"
    )


if __name__ == "__main__":
    main()
