"""The ``relay`` command: a thin adapter over the Python API.

Each subcommand parses its arguments, loads the configuration once and calls
one function; no logic lives here. Exit codes: 0 success, 1 the operation
failed (Redis unreachable, no pending decision), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from .config import ConfigError, GlobalConfig, load_config

REDIS_URL_HELP = "Redis URL (overrides redis.url / RELAY_REDIS_URL)"
EXIT_FAILED = 1
EXIT_USAGE = 2


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
    from .logs import configure_logging

    configure_logging(config.log)


# ---------------------------------------------------------------- subcommands


def cmd_gateway(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config)
    from .gateway.serve import run_gateway

    run_gateway(config)
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
    from .client import PublishError, RelayClient

    config = _config(args)
    events = _read_events(args)

    async def run() -> Any:
        async with RelayClient.from_url(
            config.redis.effective_url,
            tenant=config.redis.tenant,
            history=config.history,
            publish_retry_seconds=config.redis.publish_retry_seconds,
        ) as client:
            return await client.publish_many(args.request_id, events)

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
    from .schema import schema_text

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

    from .scripts import script, script_names

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
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from .keys import Keys

    config = _config(args)

    async def run() -> Any:
        redis = Redis.from_url(
            config.redis.effective_url, socket_timeout=config.redis.socket_timeout
        )
        try:
            return await action(redis, Keys(config.redis.tenant), config)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except RedisError as exc:
        raise CliError(f"Redis at {config.redis.effective_url} failed: {exc}") from None


def _uuid_arg(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid UUID") from None


def cmd_cancel(args: argparse.Namespace) -> int:
    from .cancel import request_cancel

    async def action(redis: Any, keys: Any, config: GlobalConfig) -> bool:
        return await request_cancel(
            redis, keys, args.id, reason=args.reason, ttl=config.cancel.tombstone_ttl_seconds
        )

    existed = _redis_action(args, action)
    print(f"cancel of {args.id} recorded" + (" (already cancelled)" if existed else ""))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from .budget import Decision, NoPendingDecision, answer_budget

    decision: Decision = "continue" if args.command == "continue" else "stop"

    async def action(redis: Any, keys: Any, config: GlobalConfig) -> Any:
        return await answer_budget(redis, keys, args.request_id, decision)

    try:
        _redis_action(args, action)
    except NoPendingDecision:
        raise CliError(f"no budget decision is pending for request {args.request_id}") from None
    print(f"{decision} sent for request {args.request_id}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from .tail import run_tail

    if args.after_seq is not None and len(args.request_id) != 1:
        raise CliError("--after-seq needs exactly one --request-id", EXIT_USAGE)

    code: int = run_tail(args)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import run_simulate_cli

    config = _config(args)
    _setup_logging(config)
    return run_simulate_cli(args, config)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_cli

    config = _config(args)
    _setup_logging(config)
    return run_demo_cli(args, config)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="relay: a Redis-backed distributed event relay for AI agent platforms.",
        epilog="Configuration: --config PATH or RELAY_CONFIG; every key can be overridden "
        "as RELAY_<SECTION>_<KEY>. Exit codes: 0 ok, 1 failed, 2 bad usage or configuration.",
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

    p = add("schema", cmd_schema, "print the JSON Schema of every frame")
    p.add_argument("--out", help="write it to this file instead (as docs/schema/events.json)")

    p = add("scripts", cmd_scripts, "list, print or write the Lua scripts other languages load")
    p.add_argument("name", nargs="?", help="print this script's source (e.g. publish)")
    p.add_argument("--out", metavar="DIR", help="write every script to DIR as <name>.lua")

    p = add("cancel", cmd_cancel, "cancel an agent (and descendants) or a whole request")
    p.add_argument("id", type=_uuid_arg, help="agent id, or request id for the whole request")
    p.add_argument("--reason", default="cancelled by user", help="reason the agents report")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    for name in ("continue", "stop"):
        p = add(name, cmd_decide, f"answer a pending budget pause: {name}")
        p.add_argument("request_id", type=_uuid_arg)
        p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)

    p = add("simulate", cmd_simulate, "run an LLM-free orchestrator (demo and load generator)")
    p.add_argument("--redis-url", dest="redis_url", help=REDIS_URL_HELP)
    from .simulate import add_simulate_arguments

    add_simulate_arguments(p)

    p = add("demo", cmd_demo, "run Redis (embedded if needed), two gateways and a simulation")
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
