"""The liveness bound: SIGKILL of an orchestrator to the terminal events at every viewer.

Starts its own redis-server and two gateway processes (each with its lease
reaper), then, RUNS times: an orchestrator process (tests/integration/lease_worker.py)
holds a request under a lease (renewed every 0.25 s, TTL 2 s; the reapers scan
every 0.2 s), streams text to four viewers (two per gateway), and is SIGKILLed
mid-run. Prints, per run, the seconds from SIGKILL until each viewer had an
``agent_failed`` for every agent, then the minimum, median and maximum over
all runs of the slowest viewer. It asserts nothing beyond what the test of the
same scenario checks (each agent failed exactly once at every viewer).

    .venv/bin/python benchmarks/lease_bound.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.lease_support import (
    LEASE_ENV,
    REAP_INTERVAL,
    RENEW_INTERVAL,
    TTL,
    kill_and_measure,
)
from tests.support import Gateway, RedisServer, start_gateways


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis").start()
        gateways = [Gateway(redis.url, workdir / f"gw-{i}.log", LEASE_ENV) for i in range(2)]
        try:
            start_gateways(gateways)
            print(
                f"lease: renew every {RENEW_INTERVAL} s, ttl {TTL} s, "
                f"reap every {REAP_INTERVAL} s; 2 gateways, 4 viewers"
            )
            slowest: list[float] = []
            for run in range(runs):
                delays = await kill_and_measure(redis.url, gateways, workdir, run)
                slowest.append(max(delays))
                print(f"run {run + 1}: " + " ".join(f"{d:.3f}" for d in delays) + " s")
            print(
                f"SIGKILL -> terminal events at the slowest viewer over {runs} runs: "
                f"min {min(slowest):.3f} s, median {statistics.median(slowest):.3f} s, "
                f"max {max(slowest):.3f} s"
            )
        finally:
            for gw in gateways:
                gw.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args().runs))
