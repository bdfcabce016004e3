"""The ``relay`` command: a thin adapter over the Python API.

Each subcommand parses its arguments, loads the configuration once and calls
one function; no logic lives here. Exit codes: 0 success, 1 the operation
failed (Redis unreachable, no pending decision, an id prefix matching no id or
several), 2 bad usage or configuration, 3 ``relay gateway`` could not start
(its address is in use or cannot be bound, or its startup failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from relay.config import ConfigError, GlobalConfig, load_config

REDIS_URL_HELP = "Redis URL (overrides redis.url / RELAY_REDIS_URL)"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_GATEWAY_START = 3
"""``relay gateway`` did not start; also uvicorn's own code for a failed startup."""
EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 failed (Redis unreachable, nothing pending, an id prefix "
    "matching no id or several); 2 bad usage or configuration; 3 the gateway could not "
    "start (address in use or not bindable, or startup failed)."
)


class CliError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> GlobalConfig:
    config = load_config(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    for section, key in (("gateway", "host"), ("gateway", "port"), ("redis", "url")):
        value = getattr(args, f"{section}_{key}", None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if overrides:
        data = config.model_dump()
        for section, values in overrides.items():
            data[section].update(values)
        try:
            config = GlobalConfig.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"invalid configuration:\n  {key}: {first['msg']} (in arguments)"
            ) from None
    return config


def _setup_logging(config: GlobalConfig) -> None:
    from relay.logs import configure_logging

    configure_logging(config.log)


# ---------------------------------------------------------------- subcommands


def _check_bindable(host: str, port: int) -> None:
    """CliError (exit 3) naming ``host:port`` when the gateway could not listen there.

    uvicorn would say so only in a log line after the app's startup had
    already connected to Redis, and exit 3 without naming the cause. This
    binds the way uvicorn does (SO_REUSEADDR) and lets go at once; a port
    taken in between still fails in uvicorn, reported by cmd_gateway.
    """
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: {exc.strerror} (gateway.host)", EXIT_GATEWAY_START
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            why = (
                "the address is already in use (another gateway or program listens there); "
                "choose another with --port or gateway.port"
                if exc.errno == errno.EADDRINUSE
                else f"{exc.strerror}"
            )
            raise CliError(f"cannot listen on {host}:{port}: {why}", EXIT_GATEWAY_START) from None


def cmd_gateway(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config)
    from relay.gateway.auth import Authenticator
    from relay.gateway.serve import run_gateway

    # A jwt mode without a key is a configuration error (exit 2), not a crash.
    Authenticator.from_config(config)
    host, port = config.gateway.host, config.gateway.port
    _check_bindable(host, port)
    try:
        run_gateway(config)
    except SystemExit as exc:
        if exc.code == EXIT_GATEWAY_START:
            raise CliError(
                f"the gateway on {host}:{port} did not start (the log above says why)",
                EXIT_GATEWAY_START,
            ) from None
        raise
    return 0


def _read_events(args: argparse.Namespace) -> list[dict[str, Any]]:
    text = args.event if args.event is not None else sys.stdin.read()
    events: list[dict[str, Any]] = []
    chunks = [text] if args.event is not None else [ln for ln in text.splitlines() if ln.strip()]
    for number, chunk in enumerate(chunks, 1):
        try:
            value = json.loads(chunk)
        except ValueError as exc:
            where = "argument" if args.event is not None else f"stdin line {number}"
            raise CliError(f"event is not valid JSON ({where}): {exc}", EXIT_USAGE) from None
        if isinstance(value, list):
            events.extend(value)
        else:
            events.append(value)
    if not events:
        raise CliError("no event given (pass JSON as an argument or on stdin)", EXIT_USAGE)
    return events


def cmd_publish(args: argparse.Namespace) -> int:
    from relay.orchestrator.client import PublishError
    from relay.orchestrator.connect import connect

    config = _config(args)
    events = _read_events(args)

    async def run() -> Any:
        # The SDK's one entry point, so every [redis] setting applies here too.
        async with connect(config) as rc:
            return await rc.client.publish_many(args.request_id, events)

    try:
        published = asyncio.run(run())
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise CliError(f"invalid event: {loc}: {first['msg']}", EXIT_USAGE) from None
    except ValueError as exc:
        raise CliError(f"invalid event: {exc}", EXIT_USAGE) from None
    except PublishError as exc:
        raise CliError(str(exc)) from None
    for seq in range(published.first_seq, published.last_seq + 1):
        print(seq)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from relay.wire.schema import schema_text

    text = schema_text()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot write: {exc.strerror}", EXIT_USAGE) from None
    print(args.out)
    return 0


def cmd_scripts(args: argparse.Namespace) -> int:
    """List the Lua scripts (name and SHA1 for EVALSHA), print one, or write them all."""
    from pathlib import Path

    from relay.wire.scripts import script, script_names

    names = script_names()
    if args.name is not None:
        name = args.name.removesuffix(".lua")
        if name not in names:
            raise CliError(
                f"no script {args.name!r}; the scripts are: {', '.join(names)}", EXIT_USAGE
            )
        sys.stdout.write(script(name).source)
        return 0
    if args.out is None:
        for name in names:
            print(f"{name}.lua\t{script(name).sha}")
        return 0
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out / f"{name}.lua").write_text(script(name).source, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot write: {exc.strerror}", EXIT_USAGE) from None
    for name in names:
        print(out / f"{name}.lua")
    return 0


def _redis_action(args: argparse.Namespace, action: Callable[..., Any]) -> Any:
    from redis.exceptions import RedisError

    from relay import redisconn
    from relay.orchestrator.connect import connect

    config = _config(args)

    async def run() -> Any:
        # Through relay.connect like the SDK, so every [redis] setting applies.
        async with connect(config) as rc:
            return await action(rc.redis, rc.keys, config)

    try:
        return asyncio.run(run())
    except RedisError as exc:
        where = redisconn.redacted_url(config.redis.effective_url)
        raise CliError(f"Redis at {where} failed: {exc}") from None


def _uuid_arg(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid UUID") from None


async def _resolve(redis: Any, keys: Any, text: str, **kw: Any) -> tuple[str, str]:
    """(full id, how it was found) for a UUID or a unique prefix of one; CliError otherwise."""
    from relay.tools.resolve import PrefixSyntaxError, ResolveError, full_id, resolve_id

    try:
        match = await resolve_id(redis, keys, text, **kw)
    except PrefixSyntaxError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except ResolveError as exc:
        raise CliError(str(exc)) from None
    if match is None:
        return full_id(text) or text, ""
    return match.id, match.describe()


def cmd_cancel(args: argparse.Namespace) -> int:
    from relay.orchestrator.cancel import request_cancel

    async def action(redis: Any, keys: Any, config: GlobalConfig) -> tuple[str, str, bool]:
        request = None
        if args.request is not None:
            request, _ = await _resolve(redis, keys, args.request, kinds=("request",))
        target, found = await _resolve(redis, keys, args.id, request_id=request)
        existed = await request_cancel(
            redis, keys, target, reason=args.reason, ttl=config.cancel.tombstone_ttl_seconds
        )
        return target, found, existed

    target, found, existed = _redis_action(args, action)
    what = found or target
    print(f"cancel of {what} recorded" + (" (already cancelled)" if existed else ""))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from relay.wire.answers import Decision, NoPendingDecision, answer_budget

    decision: Decision = "continue" if args.command == "continue" else "stop"

    async def action(redis: Any, keys: Any, config: GlobalConfig) -> str:
        rid, _ = await _resolve(redis, keys, args.request_id, kinds=("request",))
        try:
            await answer_budget(redis, keys, rid, decision)
        except NoPendingDecision:
            raise CliError(f"no budget decision is pending for request {rid}") from None
        return rid

    rid = _redis_action(args, action)
    print(f"{decision} sent for request {rid}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from relay.tools.tail import run_tail

    if args.after_seq is not None and len(args.request_id) != 1:
        raise CliError("--after-seq needs exactly one --request-id", EXIT_USAGE)

    code: int = run_tail(args)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from relay.tools.simulate import run_simulate_cli

    config = _config(args)
    _setup_logging(config)
    return run_simulate_cli(args, config)


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.tools.demo import run_demo_cli

    config = _config(args)
    _setup_logging(config)
    return run_demo_cli(args, config)


# ---------------------------------------------------------------- parser


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_arg(value: str) -> float:
    """``90``, ``30s``, ``15m``, ``1h``, ``2d`` -> seconds."""
    text = value.strip().lower()
    unit = _TTL_UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --ttl {value!r}: use seconds or a number with s, m, h or d (e.g. 1h)"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid --ttl {value!r}: must be positive")
    return seconds


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a token with the configured secret (or --private-key) and print a console URL."""
    import getpass
    import urllib.parse
    from pathlib import Path

    from relay.gateway.auth import CAPS, mint_token
    from relay.wire.keys import validate_tenant

    config = _config(args)
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    unknown = [c for c in caps if c not in CAPS]
    if unknown or not caps:
        raise CliError(
            f"--caps: unknown capability {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CAPS)}",
            EXIT_USAGE,
        )
    tenant = args.tenant or config.redis.tenant
    try:
        validate_tenant(tenant)
    except ValueError as exc:
        raise CliError(f"--tenant: {exc}", EXIT_USAGE) from None
    if args.ttl > config.auth.max_ttl_seconds:
        raise CliError(
            f"--ttl: {args.ttl:g}s exceeds auth.max_ttl_seconds ({config.auth.max_ttl_seconds})",
            EXIT_USAGE,
        )
    if args.private_key:
        try:
            key = Path(args.private_key).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(
                f"--private-key: cannot read {args.private_key}: {exc}", EXIT_USAGE
            ) from None
        algorithm = args.algorithm or "RS256"
    elif config.auth.jwt_secret:
        key, algorithm = config.auth.jwt_secret, args.algorithm or "HS256"
    else:
        raise CliError(
            "no signing key: set auth.jwt_secret (RELAY_AUTH_JWT_SECRET) or pass --private-key",
            EXIT_USAGE,
        )
    try:
        token = mint_token(
            key,
            tenant=tenant,
            caps=caps,
            sub=args.sub or getpass.getuser(),
            ttl_seconds=args.ttl,
            requests=args.request,
            algorithm=algorithm,
            audience=config.auth.audience,
            issuer=config.auth.issuer,
        )
    except Exception as exc:  # a key that does not fit the algorithm, mostly
        raise CliError(f"cannot sign the token: {exc}", EXIT_USAGE) from None
    host = config.gateway.host
    base = args.url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:" + str(
        config.gateway.port
    )
    # The console reads the token from the fragment (never sent to a server or
    # written to an access log) and keeps it in sessionStorage for the tab.
    url = base.rstrip("/") + "/#" + urllib.parse.urlencode({"token": token})
    print(token)
    print(f"console: {url}")
    print(
        f"tenant {tenant}, caps {','.join(caps)}, expires in {args.ttl:g}s"
        + (f", requests {', '.join(args.request)}" if args.request else ""),
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="relay: a Redis-backed distributed event relay for AI agent platforms.",
        epilog="Configuration: --config PATH or RELAY_CONFIG; every key can be overridden "
        "as RELAY_<SECTION>_<KEY>. " + EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config", help="config file (default: $RELAY_CONFIG, else built-in defaults)"
        )
        p.set_defaults(func=func)
        return p

    p = add("gateway", cmd_gateway, "run a WebSocket gateway")
    p.add_argument("--host", dest="gateway_host", help="bind address (gateway.host)")
    p.add_argument("--port", dest="gateway_port", type=int, help="port (gateway.port)")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    p = add(
        "publish", cmd_publish, "publish events (JSON argument, or one JSON object per stdin line)"
    )
    p.add_argument("request_id", type=_uuid_arg)
    p.add_argument("event", nargs="?", help="one event as JSON (default: read stdin)")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    p = add("tail", cmd_tail, "print a gateway's event stream as a live tree")
    p.add_argument(
        "url", nargs="?", default="ws://127.0.0.1:8000/ws/events", help="gateway WebSocket URL"
    )
    p.add_argument(
        "--request-id",
        action="append",
        type=_uuid_arg,
        default=[],
        help="follow only this request (repeatable; default: every event)",
    )
    p.add_argument("--after-seq", type=int, help="with one --request-id: resume after this seq")
    p.add_argument("--json", action="store_true", help="print raw frames")
    p.add_argument("--no-input", action="store_true", help="never prompt at a budget pause")
    p.add_argument("--exit-after", type=float, help="stop after this many seconds")

    p = add("token", cmd_token, "mint a bearer token and print it with a console URL")
    p.add_argument("--tenant", help="the tenant it is for (default: redis.tenant)")
    p.add_argument(
        "--caps", default="view", help="comma-separated: view, cancel, decide (default: view)"
    )
    p.add_argument(
        "--request",
        action="append",
        type=_uuid_arg,
        default=[],
        metavar="R",
        help="limit the token to this request (repeatable; default: the whole tenant)",
    )
    p.add_argument("--ttl", type=_ttl_arg, default=3600.0, help="lifetime: 90, 15m, 1h, 2d")
    p.add_argument("--sub", help="subject, who holds it (default: your user name)")
    p.add_argument("--private-key", help="PEM private key for RS256/ES256 (default: jwt_secret)")
    p.add_argument("--algorithm", help="HS256 with the secret; RS256 or ES256 with --private-key")
    p.add_argument("--url", help="the gateway's public base URL for the console link")

    p = add("schema", cmd_schema, "print the JSON Schema of every frame")
    p.add_argument("--out", help="write it to this file instead (as docs/schema/events.json)")

    p = add("scripts", cmd_scripts, "list, print or write the Lua scripts other languages load")
    p.add_argument("name", nargs="?", help="print this script's source (e.g. publish)")
    p.add_argument("--out", metavar="DIR", help="write every script to DIR as <name>.lua")

    p = add("cancel", cmd_cancel, "cancel an agent (and descendants) or a whole request")
    p.add_argument(
        "id",
        help="agent id, or request id for the whole request; a unique prefix (the 8 "
        "characters relay tail shows) is looked up in Redis",
    )
    p.add_argument(
        "--request",
        metavar="R",
        help="look the prefix up among this request and its agents (default: the most "
        "recently active requests)",
    )
    p.add_argument("--reason", default="cancelled by user", help="reason the agents report")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    for name in ("continue", "stop"):
        p = add(name, cmd_decide, f"answer a pending budget pause: {name}")
        p.add_argument("request_id", help="request id, or a unique prefix of a recent one")
        p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    p = add("simulate", cmd_simulate, "run an LLM-free orchestrator (demo and load generator)")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)
    from relay.tools.simulate import add_simulate_arguments

    add_simulate_arguments(p)

    p = add(
        "demo", cmd_demo, "run an embedded Redis (or a configured one), two gateways, a simulation"
    )
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)
    p.add_argument("--port", type=int, default=8000, help="first gateway port (default 8000)")
    p.add_argument("--no-simulate", action="store_true", help="start no simulated orchestrator")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relay`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
