"""``benchmarks/run``: relay's fan-out side by side with its peers, in one run.

One redis-server, every system under test as its own process on a free port,
Node load clients (``ws``), events published through relay's SDK. Systems
are alternated round by round so that the machine's load hits them alike;
the figures printed are medians over the rounds with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.fanout import report
from benchmarks.fanout.load import Publisher
from benchmarks.fanout.phases import (
    Result,
    connect,
    flat_phase,
    idle_phase,
    rate_phase,
    resume_phase,
)
from benchmarks.fanout.systems import ROOT, System, start_redis


def systems(args: argparse.Namespace) -> list[System]:
    """The systems of this run, by ``--systems`` key."""
    bpy = args.broadcaster_python
    every = {
        "ceiling": System(
            "ceiling", "ceiling: minimal ASGI app, uvicorn websockets-sansio", "ceiling"
        ),
        "broadcaster": System(
            "broadcaster",
            "encode/broadcaster 0.3.1 + Starlette 0.46.2 (redis-py 5.0.8)",
            "broadcaster",
            python=bpy or sys.executable,
        ),
        "per_socket": System(
            "per_socket", "one redis-py subscription per socket (ASGI)", "per_socket"
        ),
        "relay": System(
            "relay", "relay (uvicorn websockets-sansio, uvloop)", "relay", ws_impl="guarded"
        ),
        "floor": System(
            "floor",
            "below ASGI: websockets server + websockets.broadcast",
            "ceiling",
            server="websockets",
        ),
        # Server, WebSocket implementation, loop and compression, by measurement:
        "relay_deflate": System(
            "relay_deflate",
            "relay with permessage-deflate",
            "relay",
            ws_impl="guarded",
            deflate=True,
        ),
        "relay_asyncio": System(
            "relay_asyncio", "relay on the asyncio loop", "relay", ws_impl="guarded", loop="asyncio"
        ),
        "relay_websockets": System(
            "relay_websockets",
            "relay, uvicorn `websockets` (legacy) impl",
            "relay",
            ws_impl="websockets",
        ),
        "relay_wsproto": System(
            "relay_wsproto", "relay, uvicorn wsproto impl", "relay", ws_impl="wsproto"
        ),
        "ceiling_deflate": System(
            "ceiling_deflate", "ceiling with permessage-deflate", "ceiling", deflate=True
        ),
        "ceiling_asyncio": System(
            "ceiling_asyncio", "ceiling on the asyncio loop", "ceiling", loop="asyncio"
        ),
        "ceiling_websockets": System(
            "ceiling_websockets",
            "ceiling, uvicorn `websockets` impl",
            "ceiling",
            ws_impl="websockets",
        ),
        "ceiling_wsproto": System(
            "ceiling_wsproto", "ceiling, uvicorn wsproto impl", "ceiling", ws_impl="wsproto"
        ),
        "ceiling_granian": System(
            "ceiling_granian", "ceiling under Granian (ASGI)", "ceiling", server="granian"
        ),
        "ceiling_sse": System(
            "ceiling_sse", "ceiling over SSE (uvicorn)", "ceiling", transport="sse"
        ),
        "relay_sse": System(
            "relay_sse", "relay SSE (/sse/events)", "relay", ws_impl="guarded", transport="sse"
        ),
    }
    chosen = []
    for key in args.systems.split(","):
        if key not in every:
            raise SystemExit(f"--systems: unknown system {key!r} (one of {', '.join(every)})")
        chosen.append(every[key])
    return chosen


def machine() -> str:
    load = os.getloadavg()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, node {node}, redis-server {redis.removeprefix('v=')}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start"
    )


def versions(python: str) -> str:
    code = (
        "import importlib.metadata as m\n"
        "out=[]\n"
        "for p in ('uvicorn','websockets','wsproto','uvloop','granian','starlette',\n"
        "          'redis','broadcaster'):\n"
        "    try: out.append(p+' '+m.version(p))\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(', '.join(out))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def has_sse(system: System) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{system.port}/sse/events?request_id=x", timeout=2
        ):
            return True
    except Exception as exc:
        return getattr(exc, "code", 404) not in (404, 405)


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    chosen = systems(args)
    clients = [int(c) for c in args.clients.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    scale = [int(c) for c in args.scale_clients.split(",") if c]
    results: list[Result] = []
    header = machine()
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis, redis_url = start_redis(workdir)
        try:
            for s in chosen:
                s.start(workdir, redis_url)
                s.versions = versions(s.python)
            chosen = [s for s in chosen if s.key != "relay_sse" or has_sse(s)]
            for s in chosen:
                print(f"  {s.key}: {s.label} [{s.versions}]", flush=True)
            async with Publisher(redis_url) as pub:
                for rnd in range(args.rounds):
                    order = chosen if rnd % 2 == 0 else list(reversed(chosen))
                    for s in order:
                        for n in clients:
                            results += await one_set(s, n, pub, args, [200], rnd, rate=True)
                    print(f"-- round {rnd + 1} done", flush=True)
                main = [s for s in chosen if s.key in args.scale_systems.split(",")]
                for s in main:
                    for n in scale:
                        results += await one_set(s, n, pub, args, [200], 0, rate=False)
                    results += await one_set(
                        s, 100, pub, args, [z for z in sizes if z != 200], 0, rate=False
                    )
                for s in chosen:
                    if s.key in args.idle_systems.split(",") and args.idle:
                        r = await idle_phase(s, args.idle)
                        results.append(r)
                        print(
                            f"  idle {s.key}: {r.clients - r.failed:,} connected, "
                            f"{r.rss_mb:.0f} MB, "
                            f"{r.rss_per_conn_kb:.1f} KiB each",
                            flush=True,
                        )
                relay = next((s for s in chosen if s.key == "relay"), None)
                if relay is not None and args.backlog:
                    r = await resume_phase(relay, pub, args.backlog, 200)
                    results.append(r)
                    print(f"  resume of {args.backlog:,} events: {r.max_ms:.0f} ms", flush=True)
        finally:
            for s in chosen:
                s.stop()
            redis.stop()
    labels = {s.key: s.label for s in chosen}
    meds = report.medians(results)
    lines = [
        f"# fan-out benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        header,
        "command: benchmarks/run " + " ".join(_user_args(sys.argv[1:])),
        "",
        report.table(meds, labels),
        "",
        report.idle_table(meds, labels),
        "",
        *report.targets(meds),
    ]
    if args.overload:
        lines += ["", *overload(args)]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "fanout.md").write_text(text + "\n")
    (out / "fanout.json").write_text(
        json.dumps({"machine": header, "results": report.as_json(results)}, indent=1)
    )
    png = report.plot(meds, labels, out / "fanout.png")
    print(
        f"\nresults in {out}/fanout.md, fanout.json"
        + (", fanout.png" if png else " (no matplotlib: no plot)")
    )
    return 0


async def one_set(
    s: System,
    n: int,
    pub: Publisher,
    args: argparse.Namespace,
    sizes: list[int],
    rnd: int,
    *,
    rate: bool,
) -> list[Result]:
    """One set of ``n`` connections to ``s``: the fixed-rate and flat-out phases."""
    if s.kind == "per_socket" and n > 100:
        # A Redis connection per socket: 1,000 did not all subscribe within the
        # connect timeout here; the recipe's cost is clear at 100.
        return []
    print(f"  {s.key}: {n:,} clients connecting", flush=True)
    try:
        conns, rid = await connect(s, n)
    except (TimeoutError, RuntimeError) as exc:
        print(f"  {s.key}: {n:,} clients did not connect ({exc!r}); skipped", flush=True)
        return []
    got: list[Result] = []
    try:
        if rate:
            got.append(
                await rate_phase(
                    s, conns, rid, pub, target=args.rate, seconds=args.seconds, size=200
                )
            )
        for size in sizes:
            got.append(await flat_phase(s, conns, rid, pub, deliveries=args.deliveries, size=size))
    finally:
        await conns.close()
    for r in got:
        r.round = rnd
        r.failed = conns.failed
        lat = f" p99 {r.p99_ms:.2f} ms" if r.phase == "rate" else ""
        print(
            f"  {s.key:<18} {r.phase:<4} {n:>6,} clients {r.size:>6,} B: "
            f"{r.per_s:>9,.0f} deliveries/s "
            f"{r.cpu_us:6.1f} µs/delivery (server {r.server_cpu_pct:3.0f}% CPU, busiest client "
            f"{r.client_cpu_pct_max:3.0f}%){lat} rss {r.rss_mb:.0f} MB"
            + (f" non-events {r.others}" if r.others else "")
            + (f" FAILED {conns.failed}" if conns.failed else ""),
            flush=True,
        )
    return got


def overload(args: argparse.Namespace) -> list[str]:
    """benchmarks/overload.py's scenario (2,000 reading firehose clients), its summary."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overload.py"), "--modes", "normal"]
    print("running " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    readyz = next((line for line in lines if "/readyz:" in line), "")
    bad = readyz.split("/readyz:")[1].split()[0] if readyz else "?"
    failed, _, total = bad.partition("/")
    ok = failed.isdigit() and total.isdigit() and int(failed) <= 0.05 * int(total)
    verdict = "PASS" if ok else "MISS"
    return [
        "overload (benchmarks/overload.py --modes normal):",
        *lines,
        f"{verdict}  overload stays responsive (/readyz answered 200 for >= 95% of probes): "
        f"{bad} not 200",
    ]


def _user_args(argv: list[str]) -> list[str]:
    """The command line as the user typed it (without what benchmarks/run adds)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--broadcaster-python":
            skip = True
        else:
            out.append(arg)
    return out


def _dump_tasks(*_: object) -> None:
    """SIGUSR1: print where every task waits (a hung phase says where)."""
    for task in asyncio.all_tasks(asyncio.get_event_loop()):
        task.print_stack(limit=8, file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default="ceiling,broadcaster,per_socket,relay,floor")
    p.add_argument("--clients", default="100,1000", help="client counts of the side-by-side rounds")
    p.add_argument("--rounds", type=int, default=2, help="rounds, systems alternated")
    p.add_argument(
        "--rate", type=float, default=10_000.0, help="deliveries/s of the fixed-rate phase"
    )
    p.add_argument("--seconds", type=float, default=4.0, help="length of the fixed-rate phase")
    p.add_argument("--deliveries", type=int, default=300_000, help="deliveries per flat-out phase")
    p.add_argument("--scale-systems", default="ceiling,broadcaster,relay")
    p.add_argument("--scale-clients", default="5000", help="extra client counts, flat out")
    p.add_argument(
        "--sizes", default="200,2000,20000", help="event sizes (bytes), flat out, 100 clients"
    )
    p.add_argument("--idle", type=int, default=10_000, help="idle connections (0: skip)")
    p.add_argument("--idle-systems", default="ceiling,broadcaster,relay,relay_deflate")
    p.add_argument(
        "--backlog", type=int, default=10_000, help="events of the resume phase (0: skip)"
    )
    p.add_argument(
        "--overload", action="store_true", help="also run benchmarks/overload.py (minutes)"
    )
    p.add_argument("--broadcaster-python", default=os.environ.get("BENCH_BROADCASTER_PYTHON", ""))
    p.add_argument("--out", default="bench-results")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    # SIGTERM unwinds like Ctrl-C, so that every child process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGUSR1, _dump_tasks)
    return asyncio.run(run(args))
