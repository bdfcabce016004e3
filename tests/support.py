"""Process helpers for the integration tier: real redis-server and relay processes.

Every server runs on a free port chosen here, in its own temporary directory,
and is stopped by the fixture that started it, so tests can restart, kill and
pause servers without touching anything else on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from signal import SIGTERM
from typing import Any

import websockets

REDIS_SERVER = shutil.which("redis-server") or "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET ``url``; (status, body) also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_post_json(url: str, body: dict[str, Any], timeout: float = 5.0) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, decoded JSON answer) also for 4xx/5xx answers."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def eventually(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class RedisServer:
    """A redis-server process on a free port, restartable on the same port and dir."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        """More redis-server arguments (cluster mode, replicaof, ...)."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 10, what=f"redis-server on {self.port}")
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def command(self, *args: str) -> bytes:
        """Run one command with redis-cli semantics (raw reply bytes)."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, timeout=10, check=True
        )
        return out.stdout

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


class RelayProcess:
    """A ``relay`` subcommand run the way a user runs it (``python -m relay ...``)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.args = list(args)
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full_env.update(self.env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", *self.args],
            env=full_env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    # ``signal`` below names the method inside this class body, hence SIGTERM.
    def stop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            code = self.proc.returncode
        with contextlib.suppress(Exception):
            self._out.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Gateway(RelayProcess):
    """A ``relay gateway`` process on a free port."""

    def __init__(self, redis_url: str, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {
            "RELAY_REDIS_URL": redis_url,
            "RELAY_GATEWAY_PORT": str(self.port),
            "RELAY_GATEWAY_PROBE_INTERVAL": "0.5",
            "RELAY_GATEWAY_PROBE_TIMEOUT": "1.0",
            # Authentication is off unless a test turns it on (tests/integration/test_auth.py).
            "RELAY_AUTH_MODE": "none",
            **(extra_env or {}),
        }
        super().__init__(["gateway"], env, log)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/events"

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        status, raw = http_get(self.http + path)
        return status, json.loads(raw or b"{}")

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return http_post_json(self.http + path, body)

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def start(self) -> Gateway:
        super().start()
        try:
            wait_for(self.ready, 15, what=f"gateway on {self.port} ready")
        except TimeoutError:
            raise TimeoutError(f"gateway did not get ready:\n{self.output()}") from None
        return self


class WsClient:
    """A WebSocket client that records every frame it receives."""

    def __init__(self, url: str, **connect: Any) -> None:
        self.url = url
        self._connect = connect
        """Extra keyword arguments of ``websockets.connect`` (headers, subprotocols, origin)."""
        self.frames: list[dict[str, Any]] = []
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def __aenter__(self) -> WsClient:
        self.ws = await websockets.connect(self.url, max_size=None, **self._connect)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.frames.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def events(self, request_id: str | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.frames
            if "seq" in f
            and "ts" in f
            and (request_id is None or f.get("request_id") == request_id)
        ]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"frames so far: {self.frames[-5:]}")
            await asyncio.sleep(0.02)

    async def request(
        self, frame: dict[str, Any], reply_type: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Send a command and wait for the first new frame of ``reply_type``."""
        before = len(self.frames)
        await self.send(frame)
        await self.wait_for(
            lambda c: any(f.get("type") in (reply_type, "error") for f in c.frames[before:]),
            timeout,
        )
        return next(f for f in self.frames[before:] if f.get("type") in (reply_type, "error"))


@contextlib.asynccontextmanager
async def ws_clients(urls: Sequence[str]) -> AsyncIterator[list[WsClient]]:
    clients = [WsClient(u) for u in urls]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        yield clients


# ------------------------------------------------------------------ claims helpers
# Used by tests/integration/test_claims_*.py: black-box readings of a running
# gateway and of Redis, so those tests do not depend on the gateway's internals.


def seqs(frames: list[dict[str, Any]], rid: str) -> list[int]:
    """The seqs of ``rid``'s event frames, in the order they arrived."""
    return [f["seq"] for f in frames if f.get("request_id") == rid and "seq" in f and "ts" in f]


def metric(gw: Gateway, name: str) -> float:
    """The value of ``name`` on the gateway's ``/metrics`` (summed over its labels; 0 if absent)."""
    status, raw = http_get(gw.http + "/metrics")
    assert status == 200, status
    total = 0.0
    for line in raw.decode().splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == name or sample.startswith(name + "{"):
            total += float(value)
    return total


def numsub(redis: RedisServer, channel: str) -> int:
    """``PUBSUB NUMSUB channel``: how many connections are subscribed to ``channel``."""
    lines = redis.command("PUBSUB", "NUMSUB", channel).decode().split()
    assert lines[0] == channel, lines
    return int(lines[1])


# ====================================================================== stress helpers
# Added for the stress test and the overload benchmark: new helpers only, nothing
# above this line depends on them.


class CpuLoad:
    """Busy-loop subprocesses that keep the machine's cores busy while a test runs.

    Each loader is a separate process (not a thread: the GIL would make it load
    only the test process) and ends by itself after ``seconds``, so a test that
    dies without cleaning up cannot leave the machine loaded for long.
    """

    def __init__(self, procs: int | None = None, seconds: float = 60.0) -> None:
        self.procs = (os.cpu_count() or 1) if procs is None else procs
        self.seconds = seconds
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self) -> CpuLoad:
        code = (
            "import time\n"
            f"end = time.monotonic() + {self.seconds!r}\n"
            "while time.monotonic() < end:\n"
            "    sum(range(1000))\n"
        )
        for _ in range(self.procs):
            self._running.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return self

    def stop(self) -> None:
        """Kill every loader this object started and reap it."""
        running, self._running = self._running, []
        for proc in running:
            if proc.poll() is None:
                proc.kill()
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def __enter__(self) -> CpuLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateways(gateways: Sequence[Gateway], timeout: float = 30.0) -> None:
    """Start several gateway processes at once, then wait until every one is ready.

    Starting them one after the other (``Gateway.start``) pays the interpreter
    start-up once per gateway; on a loaded machine that dominates a short test.
    """
    for gw in gateways:
        RelayProcess.start(gw)
    for gw in gateways:
        try:
            wait_for(gw.ready, timeout, what=f"gateway on {gw.port} ready")
        except TimeoutError:
            raise TimeoutError(f"gateway did not get ready:\n{gw.output()}") from None


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in Prometheus text, or None if absent.

    Counters are looked up with and without the ``_total`` suffix, because
    prometheus_client appends it to counter names.
    """
    wanted = {name, name.removesuffix("_total"), name + "_total"}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, _, value = line.rpartition(" ")
        if sample in wanted:
            return float(value)
    return None
