"""The processes of one benchmark run: redis-server, the systems under test, their accounting.

Every system is one server process on a free port of 127.0.0.1; its CPU time
and RSS are read from ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` (the
kernel's accounting of that process, nothing it reports about itself).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")
BROADCASTER_PINS = [
    "broadcaster[redis]==0.3.1",
    "redis==5.0.8",
    "starlette==0.46.2",
    "uvicorn[standard]==0.55.0",
]
"""encode/broadcaster's venv: 0.3.1 is the last release; with redis-py 8.x it
delivers nothing, 5.0.8 is the newest redis-py it was checked with here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Granian serves from a worker process)."""
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children so far (threads included)."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Process:
    """One child process with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, workdir: Path) -> Process:
        self.log = workdir / f"{self.name}.log"
        full = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full.update(self.env)
        full.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=full,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_raise_nofile,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_redis(workdir: Path) -> tuple[Process, str]:
    port = free_port()
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    argv = [
        shutil.which("redis-server") or "redis-server",
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--save", "", "--appendonly", "no", "--maxclients", "15000",
    ]  # fmt: skip
    proc = Process("redis", argv).start(workdir)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_port(port, proc, 10)
    return proc, url


def _wait_port(port: int, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not listen on {port}:\n{proc.output()}")


def _wait_http(url: str, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready at {url}:\n{proc.output()}")


@dataclass
class System:
    """A server under test: how to start it and where its clients connect."""

    key: str
    label: str
    kind: str  # relay | ceiling | broadcaster | per_socket | floor
    transport: str = "ws"  # ws | sse
    server: str = "uvicorn"  # uvicorn | granian | websockets
    ws_impl: str = "websockets-sansio"
    loop: str = "uvloop"
    deflate: bool = False
    python: str = sys.executable
    process: Process | None = None
    port: int = 0
    versions: str = ""

    def url(self, rid: str, channel: str) -> str:
        if self.kind == "relay":
            path = "/sse/events" if self.transport == "sse" else "/ws/events"
            scheme = "http" if self.transport == "sse" else "ws"
            return f"{scheme}://127.0.0.1:{self.port}{path}?request_id={rid}"
        scheme = "http" if self.transport == "sse" else "ws"
        path = "/" if self.transport == "sse" else "/ws"
        return f"{scheme}://127.0.0.1:{self.port}{path}?channel={channel}"

    def start(self, workdir: Path, redis_url: str) -> System:
        self.port = free_port()
        env = {"BENCH_REDIS_URL": redis_url}
        if self.kind == "relay":
            env.update(relay_env(redis_url, self.port, self.deflate))
            argv = [self.python, "-m", "benchmarks.fanout.relay_variant", self.ws_impl, self.loop]
        elif self.server == "websockets":
            argv = [self.python, "-m", "benchmarks.fanout.peers", str(self.port), self.loop]
            if self.deflate:
                argv.append("deflate")
        elif self.server == "granian":
            app = {"ceiling": "ceiling", "sse": "sse_ceiling"}[
                "sse" if self.transport == "sse" else self.kind
            ]
            argv = [
                self.python, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1", "--loop", self.loop,
                "--log-level", "warning", f"benchmarks.fanout.peers:{app}",
            ]  # fmt: skip
        else:
            module = {
                "ceiling": "benchmarks.fanout.peers:sse_ceiling"
                if self.transport == "sse"
                else "benchmarks.fanout.peers:ceiling",
                "per_socket": "benchmarks.fanout.peers:per_socket",
                "broadcaster": "benchmarks.fanout.broadcaster_app:app",
            }[self.kind]
            argv = [
                self.python, "-m", "uvicorn", module, "--host", "127.0.0.1",
                "--port", str(self.port), "--ws", self.ws_impl, "--loop", self.loop,
                "--log-level", "warning", "--no-access-log", "--ws-max-size", str(1 << 24),
                "--ws-per-message-deflate", str(self.deflate).lower(),
                "--ws-ping-interval", "20",
            ]  # fmt: skip
        self.process = Process(self.key, argv, env).start(workdir)
        if self.kind == "relay":
            _wait_http(f"http://127.0.0.1:{self.port}/readyz", self.process, 30)
        else:
            _wait_port(self.port, self.process, 30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def relay_env(redis_url: str, port: int, deflate: bool) -> dict[str, str]:
    return {
        "RELAY_REDIS_URL": redis_url,
        "RELAY_GATEWAY_PORT": str(port),
        "RELAY_AUTH_MODE": "none",
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_GATEWAY_WS_PER_MESSAGE_DEFLATE": "true" if deflate else "false",
        # Every load client comes from 127.0.0.1: one "subject" to the
        # per-subject limits of [limits]; lift them, or the benchmark
        # measures the limits.
        "RELAY_LIMITS_MAX_CONNECTIONS": "30000",
        "RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": "30000",
        # The flat-out phases keep two bursts in flight per client, seconds
        # of sends queued at 1,000 clients and more: exactly what the
        # overload shedder closes connections for (delivery lag over
        # gateway.overload_lag_seconds, not falling). Off here, so the phase
        # measures sending; benchmarks/overload.py measures the shedding.
        "RELAY_GATEWAY_OVERLOAD_LAG_SECONDS": "0",
    }
