"""Every Redis client relay uses, built in one place from the ``[redis]`` config.

The gateway, the SDK (:class:`relay.orchestrator.client.RelayClient`), the CLI, the
simulator and the demo all come here, so a ``[redis]`` setting (the URL and
its ACL user, TLS files, ``tls_verify``, ``socket_timeout``, the pool size)
applies to every connection relay opens, not only to the ones someone
remembered to pass it to.

URLs: ``redis://[user:password@]host:port/db`` (plain TCP),
``rediss://...`` (TLS) or ``unix:///path/redis.sock``. The ACL user and
password travel in the URL; :func:`redacted_url` is what may be logged.

Topologies (``redis.mode``): ``standalone`` (one server), ``cluster`` (the
URL names any node; every client is a :class:`redis.asyncio.RedisCluster`
that follows MOVED/ASK and topology changes) and ``sentinel`` (the URL is
``redis+sentinel://host:port,host:port/master_name``; every connection asks
the Sentinels for the master when it is made, so after a failover the next
connection reaches the new master). Cluster clients are typed as
:class:`~redis.asyncio.Redis`: they offer the same commands, and the few
places that must differ ask :func:`is_cluster`.

TLS: ``rediss://`` plus ``tls_ca_file`` (the CA that signed the server's
certificate; empty means the system trust store), ``tls_cert_file`` and
``tls_key_file`` (a client certificate, for servers started with
``tls-auth-clients yes``). Verification of the server's certificate and host
name is on unless ``tls_verify = false``, and every client built without it
logs a WARNING naming the risk. The older ``ssl_*`` URL query parameters
still work (redis-py reads them, and they win over keyword arguments); a URL
carrying ``ssl_cert_reqs=none`` gets the same warning.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis as redis_sync
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.config import SENTINEL_SCHEME, GlobalConfig, RedisConfig, sentinel_url

log = logging.getLogger(__name__)

Role = Literal["gateway commands", "gateway control", "gateway pub/sub", "client", "probe"]

CONTROL_MAX_CONNECTIONS = 4
"""The gateway's health pool (delivery probe, /readyz): small and separate."""

_FALSE = {"0", "false", "no", "off", "n", "f"}


def redis_config(config: RedisConfig | GlobalConfig) -> RedisConfig:
    """The ``[redis]`` section of ``config`` (which may already be one)."""
    return config.redis if isinstance(config, GlobalConfig) else config


def is_cluster(redis: object) -> bool:
    """Whether ``redis`` is a Redis Cluster client (sharded pub/sub, per-slot firehose)."""
    return isinstance(redis, RedisCluster)


async def follow_master(redis: Redis) -> None:
    """Ask the Sentinels where the master is; if it moved, drop ``redis``'s idle
    connections to the old one (a Sentinel-managed client only; else nothing).

    Connections are only re-resolved when they are made: after a failover
    the old master may accept writes for a while (until the Sentinels demote
    it), and what a pooled connection writes there is lost.
    """
    pool = getattr(redis, "connection_pool", None)  # a cluster client has none
    if isinstance(pool, SentinelConnectionPool):
        await pool.get_master_address()


async def still_on_master(redis: Redis, connection: object) -> bool:
    """Whether ``connection`` (of ``redis``'s pool) still reaches the master.

    Only a Sentinel-managed client can tell: it asks the Sentinels where the
    master is now. A failover does not always close the connections to the
    old master, and a subscriber there keeps receiving (a replica relays
    what its master publishes) until that replica's link breaks: a
    subscriber checks this and moves. Anything else answers True.
    """
    pool = getattr(redis, "connection_pool", None)  # a cluster client has none
    if not isinstance(pool, SentinelConnectionPool):
        return True
    address = await pool.get_master_address()
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return (host, port) == tuple(address)


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: what logs and errors may show."""
    if url.startswith(SENTINEL_SCHEME):
        rest = url[len(SENTINEL_SCHEME) :]
        auth, at, _ = rest.partition("/")[0].rpartition("@")
        if not at or ":" not in auth:
            return url
        user = auth.partition(":")[0]
        return f"{SENTINEL_SCHEME}{user}:***@{rest[len(auth) + 1 :]}"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def url_tls_params(url: str) -> dict[str, str]:
    """The ``ssl_*`` query parameters of ``url`` (the undocumented way TLS used to work)."""
    query = parse_qs(urlsplit(url).query)
    return {k: v[-1] for k, v in query.items() if k.startswith("ssl_")}


def insecure_reasons(rc: RedisConfig) -> list[str]:
    """Why TLS connections built from ``rc`` would not verify the server (empty: they do)."""
    url = rc.effective_url
    if not url.startswith("rediss://"):
        return []
    reasons = []
    if not rc.tls_verify:
        reasons.append("redis.tls_verify = false")
    params = url_tls_params(url)
    if params.get("ssl_cert_reqs", "").lower() in ("none", "cert_none"):
        reasons.append("redis.url carries ssl_cert_reqs=none")
    elif rc.tls_verify and params.get("ssl_check_hostname", "").lower() in _FALSE:
        reasons.append("redis.url carries ssl_check_hostname=false (host name not checked)")
    return reasons


def _warn_if_insecure(rc: RedisConfig, role: Role) -> None:
    reasons = insecure_reasons(rc)
    if reasons:
        # Logged at every client build, not once per process: it must not
        # scroll away in a long-running gateway's startup noise.
        log.warning(
            "INSECURE Redis TLS for the %s client: server certificate verification is OFF "
            "(%s). Anyone on the network path to %s can impersonate Redis, read every event "
            "and forge cancels and budget answers. Set redis.tls_ca_file to the CA that "
            "signed the server certificate and remove the setting.",
            role,
            "; ".join(reasons),
            redacted_url(rc.effective_url),
            extra={"redis_role": role},
        )


def tls_kwargs(rc: RedisConfig) -> dict[str, Any]:
    """redis-py connection keyword arguments for the TLS settings of ``rc`` ({} without TLS)."""
    if not rc.effective_url.startswith("rediss://"):
        return {}
    kwargs: dict[str, Any] = {}
    if rc.tls_ca_file:
        kwargs["ssl_ca_certs"] = rc.tls_ca_file
    if rc.tls_cert_file:
        kwargs["ssl_certfile"] = rc.tls_cert_file
        kwargs["ssl_keyfile"] = rc.tls_key_file or None
    if rc.tls_verify:
        kwargs["ssl_cert_reqs"] = "required"
        kwargs["ssl_check_hostname"] = True
    else:
        kwargs["ssl_cert_reqs"] = "none"
        kwargs["ssl_check_hostname"] = False
    return kwargs


def _connection_kwargs(rc: RedisConfig, role: Role, **overrides: Any) -> dict[str, Any]:
    _warn_if_insecure(rc, role)
    timeout = rc.socket_timeout
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **tls_kwargs(rc),
    }
    kwargs.update(overrides)
    return kwargs


class _Cluster(RedisCluster):
    """RedisCluster that reads the slot map before its first command runs.

    redis-py 8.1 resolves a command's routing policy on the startup node
    before it initializes; the first initialization then replaces that node
    and closes its connections under the commands that are using them (they
    fail with AttributeError or RuntimeError, not a connection error, so
    nothing retries them). A burst of first commands, as when clients reach
    a freshly started gateway, hit it every few runs.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def _cluster(rc: RedisConfig, kwargs: dict[str, Any]) -> Redis:
    # Per node: RedisCluster keeps up to max_connections to each node.
    kwargs.pop("retry_on_error", None)
    retry = kwargs.pop("retry", None)
    cluster = _Cluster.from_url(
        rc.effective_url,
        max_connections=kwargs.pop("max_connections", rc.max_connections),
        # Retries of the cluster client re-read the topology in between, so
        # a command meeting a restarted node or a failover lands on the new
        # owner (MOVED is followed on every attempt, not counted).
        retry=retry or Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 3),
        **kwargs,
    )
    return cast(Redis, cluster)


class _SentinelPool(SentinelConnectionPool):
    """A Sentinel pool that also closes its connections to the Sentinels.

    relay makes one :class:`Sentinel` per client, so closing the client
    (which disconnects its pool) must close those too.
    """

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client's close, not a master change
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


def _sentinel(rc: RedisConfig, kwargs: dict[str, Any]) -> Redis:
    address = sentinel_url(rc.effective_url)
    timeout = kwargs.get("socket_connect_timeout", rc.socket_timeout)
    sentinel = Sentinel(
        address.sentinels,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    # Every new connection asks the Sentinels for the master's address; a
    # connection to a demoted master fails (READONLY, or the CLIENT KILL a
    # failover sends), so retries and reconnects land on the new master.
    master = sentinel.master_for(
        address.master,
        connection_pool_class=_SentinelPool,
        db=address.db,
        username=address.username,
        password=address.password,
        max_connections=kwargs.pop("max_connections", rc.max_connections),
        **kwargs,
    )
    return cast(Redis, master)


def _build(rc: RedisConfig, kwargs: dict[str, Any], *, blocking_pool: bool) -> Redis:
    """A client of ``rc``'s topology with connection keyword arguments ``kwargs``."""
    if rc.mode == "cluster":
        return _cluster(rc, kwargs)
    if rc.mode == "sentinel":
        return _sentinel(rc, kwargs)
    if blocking_pool:
        pool = BlockingConnectionPool.from_url(
            rc.effective_url,
            max_connections=kwargs.pop("max_connections", rc.max_connections),
            timeout=rc.pool_timeout,
            **kwargs,
        )
        return Redis.from_pool(pool)
    return Redis.from_url(rc.effective_url, **kwargs)


def command_client(config: RedisConfig | GlobalConfig) -> Redis:
    """The gateway's command client: a bounded, blocking pool with retries.

    Commands wait for a free pooled connection (up to ``pool_timeout``)
    instead of failing with "Too many connections" under a burst; a command
    that meets a connection Redis closed (a restart) is retried on a fresh one
    with backoff, for about as long as a restart takes. Every command the
    gateway sends is a read or safe to repeat (cancel tombstones, pause-scoped
    answers), so a retry after an ambiguous failure does no harm.
    """
    rc = redis_config(config)
    kwargs = _connection_kwargs(
        rc,
        "gateway commands",
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return _build(rc, kwargs, blocking_pool=True)


def control_client(config: RedisConfig | GlobalConfig) -> Redis:
    """The gateway's health client (delivery probe, ``/readyz``'s ping).

    A small pool of its own: a burst of commands or history reads that fills
    the main pool must not make a healthy gateway look dead and rebuild its
    subscription.
    """
    rc = redis_config(config)
    kwargs = _connection_kwargs(
        rc,
        "gateway control",
        max_connections=CONTROL_MAX_CONNECTIONS,
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.2), 2),
    )
    return _build(rc, kwargs, blocking_pool=False)


def pubsub_client(config: RedisConfig | GlobalConfig) -> Redis:
    """The gateway's pub/sub client: every connection error surfaces, none is retried.

    It must not quietly reconnect and resubscribe: the hub recovers itself and
    backfills what was published meanwhile. No read timeout (a subscribed
    connection is idle between messages; the delivery probe watches it), but
    TCP keepalive and a connect timeout.

    On a cluster this client only reads the topology; the subscriptions are
    made on one connection per node, from :func:`node_pubsub_client`.
    """
    rc = redis_config(config)
    return _build(rc, _pubsub_kwargs(rc), blocking_pool=False)


def _pubsub_kwargs(rc: RedisConfig) -> dict[str, Any]:
    # TCP keepalive (not a unix socket option) finds a peer that vanished.
    keepalive = {} if rc.effective_url.startswith("unix://") else {"socket_keepalive": True}
    kwargs = _connection_kwargs(rc, "gateway pub/sub", retry=Retry(NoBackoff(), 0), **keepalive)
    del kwargs["socket_timeout"]
    return kwargs


async def refresh_topology(redis: Redis) -> None:
    """Re-read which node owns which slot (a cluster client only; else nothing).

    Commands follow MOVED by themselves; a subscriber does not meet MOVED
    until it subscribes again, so it asks here before it does.
    """
    if is_cluster(redis):
        await cast(RedisCluster, redis).nodes_manager.initialize()


def shard_owner(redis: Redis, channel: str) -> ClusterNode:
    """The primary that owns ``channel``'s slot, in ``redis``'s (cluster) topology."""
    node = cast(RedisCluster, redis).get_node_from_key(channel)
    if node is None:  # pragma: no cover - only with replica=True
        raise SlotNotCoveredError(f"no node owns the slot of {channel}")
    return node


def node_client(node: ClusterNode) -> Redis:
    """A client of one cluster node, with the cluster client's own settings (auth, TLS).

    For subscriptions: errors surface and are never retried here, the
    subscriber rebuilds itself (and re-reads the topology first).
    """
    kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    return Redis.from_pool(ConnectionPool(connection_class=node.connection_class, **kwargs))


async def shard_pubsub(redis: Redis, channel: str) -> tuple[PubSub, Redis | None]:
    """A pub/sub connection subscribed to ``channel``: SSUBSCRIBE on the node that owns it
    on a cluster (after re-reading the topology), SUBSCRIBE otherwise.

    Returns the pub/sub and, on a cluster, the node client it came from (the
    caller closes both). Its messages are ``"smessage"`` on a cluster; an
    unasked ``"sunsubscribe"`` means the slot moved: subscribe again.
    """
    if not is_cluster(redis):
        pubsub = redis.pubsub()
        await pubsub.subscribe(channel)
        return pubsub, None
    await refresh_topology(redis)
    node = node_client(shard_owner(redis, channel))
    pubsub = node.pubsub()
    try:
        await pubsub.ssubscribe(channel)
    except BaseException:
        await pubsub.aclose()
        await node.aclose()
        raise
    return pubsub, node


def client(config: RedisConfig | GlobalConfig, *, socket_timeout: float | None = None) -> Redis:
    """A client for the SDK and the CLI: a blocking pool of ``max_connections``.

    ``socket_timeout`` (default ``redis.socket_timeout``) bounds connecting and
    every reply; a command waits up to ``pool_timeout`` for a free connection.
    Errors are not retried here: :class:`relay.orchestrator.client.RelayClient` retries
    publishes itself, with the publish id that makes a retry safe.
    """
    rc = redis_config(config)
    timeout = rc.socket_timeout if socket_timeout is None else socket_timeout
    kwargs = _connection_kwargs(
        rc, "client", socket_timeout=timeout, socket_connect_timeout=timeout
    )
    return _build(rc, kwargs, blocking_pool=True)


def sync_client(config: RedisConfig | GlobalConfig, *, socket_timeout: float) -> redis_sync.Redis:
    """A synchronous client (``relay demo`` checks with it that Redis answers)."""
    rc = redis_config(config)
    kwargs = _connection_kwargs(
        rc, "probe", socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
    )
    if rc.mode == "sentinel":
        from redis.sentinel import Sentinel as SyncSentinel

        address = sentinel_url(rc.effective_url)
        sentinel = SyncSentinel(address.sentinels, sentinel_kwargs=dict(kwargs))
        master = sentinel.master_for(
            address.master,
            db=address.db,
            username=address.username,
            password=address.password,
            **kwargs,
        )
        return cast(redis_sync.Redis, master)
    # On a cluster: the node the URL names (the demo only checks it answers).
    return redis_sync.Redis.from_url(rc.effective_url, **kwargs)
