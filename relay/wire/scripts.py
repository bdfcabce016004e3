"""The atomic Redis scripts, loaded from ``relay/wire/lua`` once per process.

Scripts run with EVALSHA and fall back to SCRIPT LOAD when the server does not
know them (a restarted Redis, a failover), so callers never see NOSCRIPT.
The sources ship in the package so orchestrators in other languages can load
the very same scripts (see docs/PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import hashlib
from functools import cache
from importlib import resources
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

RedisClient = Redis


PUBLISH_LINE = "local PUBLISH = 'PUBLISH'"
SHARDED_PUBLISH_LINE = "local PUBLISH = 'SPUBLISH'"
"""The one line of ``publish.lua`` that differs on a Redis Cluster (sharded pub/sub)."""


class Calls(Protocol):
    """Something that runs single commands over ``redis``, sharing round trips
    (:class:`relay.orchestrator.autopipe.AutoPipeline`)."""

    redis: Redis

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply or its error."""
        ...


class LuaScript:
    """One Lua script from the package, called by SHA with a load fallback.

    ``sharded=True`` is the variant for a Redis Cluster: its publishes are
    SPUBLISH (to the node owning the channel's slot) instead of PUBLISH
    (broadcast to every node). Only ``publish`` publishes.
    """

    def __init__(self, name: str, *, sharded: bool = False) -> None:
        self.name = name
        source = resources.files("relay.wire").joinpath("lua", f"{name}.lua").read_text("utf-8")
        if sharded:
            if source.count(PUBLISH_LINE) != 1:
                raise ValueError(f"{name}.lua has no line {PUBLISH_LINE!r} to shard")
            source = source.replace(PUBLISH_LINE, SHARDED_PUBLISH_LINE)
        self.sharded = sharded
        self.source = source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, redis: Redis, keys: list[str], args: list[Any]) -> Any:
        """Run the script; loads it first if the server lost it."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    def submit_in(self, calls: Calls, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue an EVALSHA of this script in ``calls`` (see :func:`is_noscript`)."""
        return calls.submit("EVALSHA", self.sha, len(keys), *keys, *args)

    async def call_in(self, calls: Calls, keys: list[str], args: list[Any]) -> Any:
        """Like calling the script, through ``calls`` (its round trip shared)."""
        try:
            return await self.submit_in(calls, keys, args)
        except ResponseError as exc:
            if not is_noscript(exc):
                raise
            await self.load(calls.redis)
            return await self.submit_in(calls, keys, args)

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        """Add an EVALSHA of this script to a pipeline (see :func:`is_noscript`).

        Queued as a plain command: redis-py's cluster pipeline refuses its
        ``evalsha`` method, but routes an EVALSHA command by its keys, which
        share one slot in every relay script.
        """
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        """SCRIPT LOAD the source; idempotent."""
        await redis.script_load(self.source)


def is_noscript(result: object) -> bool:
    """True when a pipeline result is the server's NOSCRIPT error."""
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT")
    )


def as_text(value: object) -> str:
    """A Redis reply as text (clients here do not decode replies themselves)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def script_names() -> list[str]:
    """Names of every script shipped in ``relay/wire/lua`` (without ``.lua``), sorted."""
    folder = resources.files("relay.wire").joinpath("lua")
    return sorted(f.name.removesuffix(".lua") for f in folder.iterdir() if f.name.endswith(".lua"))


@cache
def script(name: str, *, sharded: bool = False) -> LuaScript:
    """The process-wide instance of script ``name`` (read from disk on first use).

    ``sharded`` selects the Redis Cluster variant (see :class:`LuaScript`).

    >>> script("publish", sharded=True).source.count("SPUBLISH") > 0
    True
    """
    return LuaScript(name, sharded=sharded)
