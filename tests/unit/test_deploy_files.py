"""Static checks of the deployment files: Dockerfile, docker-compose.yml, deploy/haproxy.cfg.

No container engine is needed: the files are parsed and checked against what
the gateways expect, and ``haproxy -c`` validates the balancer configuration
when haproxy is installed. :func:`localize_haproxy_cfg` (used by the topology
test to run the same balancer configuration against local processes) is
tested here too.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
)
GATEWAYS = ("gateway1", "gateway2", "gateway3")
CONFIG_IN_CONTAINER = "/etc/relay/config.toml"
GATEWAY_PORT = 8000
LB_PORT = 8080


# ---------------------------------------------------------------- haproxy.cfg helpers

_SERVER = re.compile(r"^(?P<indent>\s*)server\s+(?P<name>\S+)\s+(?P<addr>\S+)(?P<rest>.*)$")
_BIND = re.compile(r"^(?P<indent>\s*)bind\s+(?P<addr>\S+)(?P<rest>.*)$")


def localize_haproxy_cfg(text: str, bind_port: int, servers: Mapping[str, int]) -> str:
    """The same HAProxy configuration with local addresses.

    Every ``bind`` address becomes ``127.0.0.1:<bind_port>`` and every
    ``server NAME ADDR`` gets ``127.0.0.1:<servers[NAME]>``; every other line
    is kept byte for byte. Raises ``ValueError`` when a server has no port
    given or a given name is not in the configuration, so the copy can never
    silently differ from the original in its servers.
    """
    out: list[str] = []
    seen: set[str] = set()
    binds = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        if m := _SERVER.match(body):
            name = m["name"]
            if name not in servers:
                raise ValueError(f"no local port given for server {name!r}")
            seen.add(name)
            body = f"{m['indent']}server {name} 127.0.0.1:{servers[name]}{m['rest']}"
        elif m := _BIND.match(body):
            binds += 1
            body = f"{m['indent']}bind 127.0.0.1:{bind_port}{m['rest']}"
        out.append(body + ending)
    if missing := set(servers) - seen:
        raise ValueError(f"servers not in the configuration: {sorted(missing)}")
    if binds == 0:
        raise ValueError("the configuration has no bind line")
    return "".join(out)


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """``{"defaults": [...], "backend gateways": [...]}``: stripped, comment-free lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not raw[0].isspace():
            current = sections.setdefault(line, [])
        elif current is not None:
            current.append(line)
    return sections


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    assert HAPROXY is not None
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


# ---------------------------------------------------------------- Dockerfile helpers


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = yaml.safe_load(self.args)  # JSON arrays are YAML
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON array) form"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (continuations joined, ARGs expanded)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], ""), words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, alias, []))
            continue
        assert stages, f"instruction before FROM: {line}"
        stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_slim_python(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    assert re.fullmatch(r"python:3\.1[1-9]-slim", final.base), final.base
    copies = [c.args for c in final.all("COPY")]
    assert any(c.startswith("--from=builder ") for c in copies), copies


def test_builder_builds_a_wheel_into_a_virtualenv(stages: list[Stage]) -> None:
    runs = " ".join(i.args for i in stages[0].all("RUN"))
    assert "pip wheel" in runs
    assert "-m venv" in runs


def test_final_stage_has_no_build_toolchain(final: Stage) -> None:
    text = " ".join(f"{i.keyword} {i.args}" for i in final.instructions)
    for tool in ("gcc", "build-essential", "g++", "make ", "apt-get install", "pip wheel"):
        assert tool not in text, f"{tool!r} in the final stage"
    # Only the built virtualenv and the configuration come into the final stage.
    for copy in final.all("COPY"):
        assert copy.args.startswith("--from=builder /opt/relay") or copy.args.startswith(
            "config.toml "
        ), copy.args


def test_runs_as_a_non_root_user(final: Stage) -> None:
    user = final.last("USER").args.split(":")[0]
    assert user not in ("root", "0", "")
    last_user_index = max(i for i, ins in enumerate(final.instructions) if ins.keyword == "USER")
    assert all(ins.keyword != "RUN" for ins in final.instructions[last_user_index:]), (
        "RUN after USER would run as the unprivileged user by accident"
    )


def test_entrypoint_runs_relay_gateway(final: Stage) -> None:
    assert final.last("ENTRYPOINT").exec_form() == ["relay"]
    cmd = final.last("CMD").exec_form()
    assert cmd[0] == "gateway"
    args = build_parser().parse_args(cmd)
    assert args.command == "gateway"
    assert args.config == CONFIG_IN_CONTAINER


def test_listens_on_all_interfaces(final: Stage) -> None:
    env = " ".join(i.args for i in final.all("ENV"))
    assert "RELAY_GATEWAY_HOST=0.0.0.0" in env
    assert str(GATEWAY_PORT) in final.last("EXPOSE").args.split()


def test_healthcheck_probes_healthz_with_python(final: Stage) -> None:
    check = final.last("HEALTHCHECK").args
    assert "CMD" in check
    command = check[check.index("CMD") + 3 :].strip()
    argv = Instruction("CMD", command).exec_form()
    assert argv[0] == "python", "slim images have no curl or wget"
    assert "/healthz" in argv[-1]
    compile(argv[-1], "<healthcheck>", "exec")
    assert "curl" not in check and "wget" not in check


def test_copied_sources_exist(stages: list[Stage]) -> None:
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
            if copy.args.startswith("--from="):
                continue
            for source in words[:-1]:
                if "*" in source:
                    continue
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_dockerignore_keeps_the_build_context_small() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".git", "tests", ".venv", "**/__pycache__"):
        assert excluded in patterns
    for needed in ("relay", "pyproject.toml", "config.toml", "README.md"):
        assert needed not in patterns


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"redis", *GATEWAYS, "lb", "orchestrator"}


def test_redis_persists_with_appendonly_everysec(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateway_service(services: dict[str, dict[str, Any]], name: str) -> None:
    gw = services[name]
    args = build_parser().parse_args(gw["command"])
    assert args.command == "gateway"
    assert args.config == CONFIG_IN_CONTAINER
    env = gw["environment"]
    assert env["RELAY_REDIS_URL"].startswith("redis://redis:")
    assert env["RELAY_GATEWAY_HOST"] == "0.0.0.0"
    assert int(env["RELAY_GATEWAY_PORT"]) == GATEWAY_PORT
    assert f"./config.toml:{CONFIG_IN_CONTAINER}:ro" in gw["volumes"]
    health = gw["healthcheck"]["test"]
    assert health[0] == "CMD" and health[1] == "python"
    assert f":{GATEWAY_PORT}/readyz" in health[-1]
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in gw, "gateways are reached through the balancer only"
    grace = gw["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > 8, "longer than gateway.drain_timeout"


def test_balancer_service(services: dict[str, dict[str, Any]]) -> None:
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    assert lb["ports"] == [f"{LB_PORT}:{LB_PORT}"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert set(lb["depends_on"]) == set(GATEWAYS)
    published = [n for n, s in services.items() if s.get("ports")]
    assert published == ["lb"]


def test_orchestrator_runs_simulate_forever(services: dict[str, dict[str, Any]]) -> None:
    orch = services["orchestrator"]
    command = orch["command"]
    assert command[:2] == ["simulate", "--forever"]
    args = build_parser().parse_args(command)
    assert args.command == "simulate"
    assert args.config == CONFIG_IN_CONTAINER
    assert orch["environment"]["RELAY_REDIS_URL"].startswith("redis://redis:")
    assert f"./config.toml:{CONFIG_IN_CONTAINER}:ro" in orch["volumes"]
    # The image's HEALTHCHECK probes a gateway; the orchestrator serves no HTTP.
    assert orch["healthcheck"] == {"disable": True}
    assert orch["depends_on"]["redis"]["condition"] == "service_healthy"


def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] in ("service_started", "service_healthy")
            if spec["condition"] == "service_healthy":
                assert (
                    "healthcheck" in services[dep]
                    and services[dep]["healthcheck"].get("disable") is not True
                )


# ---------------------------------------------------------------- deploy/haproxy.cfg


def test_haproxy_backends_are_the_compose_gateways(services: dict[str, dict[str, Any]]) -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    servers = [line.split() for line in sections["backend gateways"] if line.startswith("server ")]
    assert [s[1] for s in servers] == list(GATEWAYS)
    assert [s[2] for s in servers] == [f"{g}:{GATEWAY_PORT}" for g in GATEWAYS]
    assert all(g in services for g in GATEWAYS)
    assert sections["frontend relay"] == ["bind :8080", "default_backend gateways"]


def test_haproxy_checks_readyz_without_stickiness() -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    backend = sections["backend gateways"]
    assert "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend
    assert "http-check expect status 200" in backend
    default_server = next(line for line in backend if line.startswith("default-server "))
    assert " check " in f" {default_server} "
    assert "init-addr last,libc,none" in default_server
    for line in backend:
        word = line.split()[0]
        assert word not in ("cookie", "stick", "stick-table", "hash-type"), line
        assert line not in ("balance source", "balance uri"), line
    assert "balance leastconn" in backend


def test_haproxy_websocket_timeouts() -> None:
    defaults = haproxy_sections(HAPROXY_CFG.read_text())["defaults"]
    assert "mode http" in defaults
    tunnel = next(line for line in defaults if line.startswith("timeout tunnel "))
    assert tunnel.split()[2] in ("1h", "3600s")
    assert "option redispatch 1" in defaults


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_haproxy_config_is_valid() -> None:
    result = haproxy_check(HAPROXY_CFG)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- localize_haproxy_cfg


def test_localize_rewrites_only_bind_and_server_addresses() -> None:
    original = HAPROXY_CFG.read_text()
    ports = {"gateway1": 18001, "gateway2": 18002, "gateway3": 18003}
    local = localize_haproxy_cfg(original, 18080, ports)
    before, after = original.splitlines(), local.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.strip() for _, b in changed] == [
        "bind 127.0.0.1:18080",
        "server gateway1 127.0.0.1:18001",
        "server gateway2 127.0.0.1:18002",
        "server gateway3 127.0.0.1:18003",
    ]


def test_localize_keeps_server_options() -> None:
    text = "frontend f\n    bind :80 name x\nbackend b\n    server a a:1 check weight 5\n"
    local = localize_haproxy_cfg(text, 9, {"a": 2})
    assert local == (
        "frontend f\n    bind 127.0.0.1:9 name x\n"
        "backend b\n    server a 127.0.0.1:2 check weight 5\n"
    )


def test_localize_refuses_unknown_or_missing_servers() -> None:
    text = HAPROXY_CFG.read_text()
    with pytest.raises(ValueError, match="gateway3"):
        localize_haproxy_cfg(text, 1, {"gateway1": 2, "gateway2": 3})
    with pytest.raises(ValueError, match="gateway9"):
        localize_haproxy_cfg(text, 1, {"gateway1": 2, "gateway2": 3, "gateway3": 4, "gateway9": 5})


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_localized_config_is_valid_and_resolves(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    ports = {"gateway1": 18001, "gateway2": 18002, "gateway3": 18003}
    cfg.write_text(localize_haproxy_cfg(HAPROXY_CFG.read_text(), 18080, ports))
    result = haproxy_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not resolve" not in result.stderr


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateways_run_with_auth_on(services: dict[str, dict[str, Any]], name: str) -> None:
    """The compose stack authenticates: jwt mode, and no gateway starts without a secret."""
    from relay.config import load_config
    from relay.gateway.auth import Authenticator

    env = services[name]["environment"]
    assert env["RELAY_AUTH_MODE"] == "jwt"
    secret = env["RELAY_AUTH_JWT_SECRET"]
    assert secret.startswith("${RELAY_AUTH_JWT_SECRET:?"), "required, never a default"
    resolved = {**{k: str(v) for k, v in env.items()}, "RELAY_AUTH_JWT_SECRET": "k" * 64}
    resolved["RELAY_AUTH_METRICS_TOKEN"] = ""
    resolved.pop("RELAY_CONFIG")
    assert Authenticator.from_config(load_config(ROOT / "config.toml", resolved)).enabled
