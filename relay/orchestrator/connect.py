"""``relay.connect``: the one entry point of an orchestrator.

>>> async with relay.connect("redis://localhost:6379", tenant="acme") as rc:
...     async with rc.request(budget=200_000) as req:
...         async with req.agent("Research prices") as agent:
...             await agent.text("Prices rose", tokens=2)

The connection owns everything the SDK needs, built from the settings of
the config file (:class:`relay.config.GlobalConfig`): the Redis client
(through :func:`relay.redisconn.client`, so every ``[redis]`` setting
applies: ACL user, TLS, timeouts, pool size), the publishing
:class:`~relay.orchestrator.client.RelayClient` and the process's
:class:`~relay.orchestrator.cancel.CancelRegistry`. The registry's pub/sub
connection is opened by the first request, so short-lived users (the CLI's
``publish``, ``cancel``, ``continue``) never hold one. Closing stops the
registry, then closes the Redis pool.
"""

from __future__ import annotations

import asyncio
import uuid
from types import TracebackType
from typing import Protocol, Self

from pydantic import ValidationError
from redis.asyncio import Redis

from relay.config import ConfigError, GlobalConfig, RedisConfig, load_config
from relay.orchestrator.cancel import CancelRegistry, request_cancel
from relay.orchestrator.client import RelayClient
from relay.orchestrator.request import Request, normalize_id
from relay.wire.answers import Decision, answer_budget
from relay.wire.keys import Keys, validate_tenant


class LeaseHook(Protocol):
    """What a request tells the orchestrator's liveness lease (``rc.lease``).

    The request context calls ``hold`` when it starts and ``release`` when it
    ends, so the process's lease in Redis covers exactly its running requests.

    >>> class Printing:
    ...     async def hold(self, request_id: str) -> None: print("hold", request_id)
    ...     async def release(self, request_id: str) -> None: print("release", request_id)
    >>> rc.lease = Printing()
    """

    async def hold(self, request_id: str) -> None:
        """The request started running in this process."""

    async def release(self, request_id: str) -> None:
        """The request ended in this process."""


def resolve_config(
    config: GlobalConfig | RedisConfig | str | None, *, tenant: str | None = None
) -> GlobalConfig:
    """The settings :func:`connect` uses: a config, a ``[redis]`` section, a URL or None.

    None loads the configuration (``RELAY_CONFIG`` and ``RELAY_*``) once;
    a URL is ``redis.url`` over the defaults. ``tenant`` replaces
    ``redis.tenant``. Raises :class:`relay.ConfigError` naming the key.

    >>> resolve_config("redis://127.0.0.1:6390/0", tenant="acme").redis.tenant
    'acme'
    """
    if config is None:
        full = load_config()
    elif isinstance(config, GlobalConfig):
        full = config
    elif isinstance(config, RedisConfig):
        full = GlobalConfig(redis=config)
    elif isinstance(config, str):
        try:
            full = GlobalConfig(redis=RedisConfig(url=config))
        except ValidationError as exc:
            raise ConfigError(f"redis.url: {exc.errors()[0]['msg']} (in connect())") from None
    else:
        raise TypeError(
            f"config: a GlobalConfig, a RedisConfig, a Redis URL or None, "
            f"got {type(config).__name__}"
        )
    if tenant is not None and tenant != full.redis.tenant:
        try:
            validate_tenant(tenant)
        except ValueError as exc:
            raise ConfigError(f"redis.tenant: {exc} (in connect())") from None
        full = full.model_copy(update={"redis": full.redis.model_copy(update={"tenant": tenant})})
    return full


class RelayConnection:
    """An orchestrator's connection to relay; made by :func:`connect`.

    >>> async with relay.connect(config) as rc:
    ...     async with rc.request() as req: ...
    ...     await rc.cancel(agent_id)                       # any host's agent
    ...     await rc.answer_budget(request_id, "continue")  # a pending pause
    """

    def __init__(
        self, config: GlobalConfig, *, redis: Redis | None = None, lease: bool = True
    ) -> None:
        self.config = config
        """The settings in force (after ``tenant=``)."""
        if redis is None:
            self.client = RelayClient.from_config(config, lease=lease)
        else:
            self.client = RelayClient(
                redis,
                tenant=config.redis.tenant,
                history=config.history,
                publish_retry_seconds=config.redis.publish_retry_seconds,
                owns_connection=False,
                lease=config.lease if lease else None,
            )
        """The lower-level publisher (``publish``, ``publish_many``)."""
        self.cancels = CancelRegistry(
            self.client.redis, self.client.keys, poll_interval=config.cancel.poll_interval
        )
        """The process's cancel registry (started by the first request)."""
        self.lease: LeaseHook | None = self.client.lease
        """Told of every request this process runs (orchestrator liveness, ``[lease]``:
        a :class:`relay.LeaseKeeper`, renewed in the background); None: no lease."""
        self._listening_lock = asyncio.Lock()
        self._listening_started = False
        self._requests: set[Request] = set()
        self._closed_for_good = False

    @property
    def redis(self) -> Redis:
        """The Redis client everything here uses."""
        return self.client.redis

    @property
    def keys(self) -> Keys:
        """The key builder of the connection's tenant."""
        return self.client.keys

    @property
    def tenant(self) -> str:
        """The tenant every request of this connection belongs to."""
        return self.client.tenant

    def request(self, request_id: str | None = None, *, budget: int | None = None) -> Request:
        """A request as an async context (a fresh id when None).

        ``budget`` is the request's token total (default
        ``budget.default_request_budget``; below 10,000 it is raised to 10,000).
        The same request may run in several processes: each opens its own
        context with the same id and shares the budget and cancels.
        """
        if self._closed_for_good:
            raise RuntimeError("the connection is closed")
        rid = normalize_id(request_id, "request_id") if request_id is not None else None
        return Request(self, rid or str(uuid.uuid4()), budget=budget)

    async def cancel(self, target_id: str, *, reason: str = "cancelled by user") -> bool:
        """Cancel an agent (and its descendants) or a whole request, on every host.

        Returns True when it was already cancelled.
        """
        target = normalize_id(target_id, "target_id")
        return await request_cancel(
            self.redis,
            self.keys,
            target,
            reason=reason,
            ttl=self.config.cancel.tombstone_ttl_seconds,
        )

    async def answer_budget(
        self, request_id: str, decision: Decision, pause_id: str | None = None
    ) -> dict[str, object]:
        """Record a continue/stop decision for the request's pending pause (first wins).

        Raises :class:`relay.NoPendingDecision` when none is pending.
        """
        rid = normalize_id(request_id, "request_id")
        return await answer_budget(self.redis, self.keys, rid, decision, pause_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the cancel registry, then close the Redis pool (if this connection made it)."""
        self._closed_for_good = True
        try:
            if self._listening_started:
                await self.cancels.close()
        finally:
            await self.client.aclose()

    async def _listening(self) -> CancelRegistry:
        """The registry, subscribed (the first request subscribes it)."""
        if not self._listening_started:
            async with self._listening_lock:
                if not self._listening_started:
                    await self.cancels.start()
                    self._listening_started = True
        return self.cancels

    def _opened(self, request: Request) -> None:
        self._requests.add(request)

    def _closed(self, request: Request) -> None:
        self._requests.discard(request)


def connect(
    config: GlobalConfig | RedisConfig | str | None = None,
    *,
    tenant: str | None = None,
    redis: Redis | None = None,
    lease: bool = True,
) -> RelayConnection:
    """Connect an orchestrator to relay; use it as ``async with``.

    ``config`` is a :class:`relay.GlobalConfig` (``relay.load_config()``), a
    ``[redis]`` section, a Redis URL, or None to load the configuration from
    ``RELAY_CONFIG`` and ``RELAY_*``. ``tenant`` overrides ``redis.tenant``.
    ``redis`` shares an existing client instead (not closed on exit).
    ``lease`` (default True): the process holds a liveness lease on every
    request it runs, so that gateways finish them for every viewer if it dies.

    >>> async with relay.connect(relay.load_config(), tenant="acme") as rc:
    ...     async with rc.request(budget=200_000) as req: ...
    """
    return RelayConnection(resolve_config(config, tenant=tenant), redis=redis, lease=lease)
