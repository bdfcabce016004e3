"""Configuration: ``config.toml`` plus ``RELAY_<SECTION>_<KEY>`` overrides, loaded once.

Precedence, lowest first: built-in defaults, the TOML file, the environment.
Every value is validated by pydantic; a bad value is a :class:`ConfigError`
whose message names the key (``gateway.port``) and where it came from, and
the CLI turns it into exit code 2. Unknown keys are errors too: a typo must
not silently fall back to a default, which is what the original did.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.wire.keys import validate_tenant

log = logging.getLogger(__name__)

ENV_PREFIX = "RELAY_"
MIN_REQUEST_BUDGET = 10_000

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisConfig(_Section):
    """``[redis]``: where Redis is and how to reach it (see relay/redisconn.py).

    The TLS settings need a ``rediss://`` URL: with ``redis://`` (or
    ``unix://``) they are an error rather than ignored, so a CA file in the
    config never hides a plain-text connection.

    ``mode`` says what the URL names: one server (``standalone``), any node
    of a Redis Cluster (``cluster``), or the Sentinels that watch a master
    (``sentinel``, with ``redis+sentinel://host:port,host:port/master_name``;
    a URL of that form alone selects it).

    >>> RedisConfig(url="rediss://redis.internal:6380/0", tls_ca_file="ca.pem").tenant
    'default'
    """

    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        default="standalone", validate_default=True
    )
    url: str = Field(
        default="",
        validate_default=True,
        description="redis:// or rediss:// URL; empty means 127.0.0.1:6379 "
        "(`relay demo` starts its own embedded server unless a url is set); "
        "redis+sentinel://host:port,host:port/master_name for Sentinel",
    )
    tenant: str = "default"
    tenants: list[str] = Field(
        default_factory=list,
        description="tenants a gateway serves (its Redis ACL user covers them); empty: any",
    )
    socket_timeout: PositiveFloat = 5.0
    publish_retry_seconds: Annotated[float, Field(ge=0)] = 10.0
    max_connections: PositiveInt = 64
    pool_timeout: PositiveFloat = 5.0
    tls_verify: bool = Field(default=True, validate_default=True)
    tls_ca_file: str = Field(default="", validate_default=True)
    tls_cert_file: str = Field(default="", validate_default=True)
    tls_key_file: str = Field(default="", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _mode_from_url(cls, data: Any) -> Any:
        # A redis+sentinel:// URL names Sentinels, never a server: it selects
        # sentinel mode unless a mode was set (then a mismatch is an error).
        if isinstance(data, dict) and "mode" not in data:
            url = data.get("url")
            if isinstance(url, str) and url.startswith(SENTINEL_SCHEME):
                return {**data, "mode": "sentinel"}
        return data

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode", "standalone")
        if mode == "sentinel":
            sentinel_url(value)  # raises naming what is wrong
            return value
        if value.startswith(SENTINEL_SCHEME):
            raise ValueError(f'a {SENTINEL_SCHEME} url needs redis.mode = "sentinel", not {mode!r}')
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if mode == "cluster":
            if value.startswith("unix://"):
                raise ValueError(
                    'redis.mode = "cluster" needs a redis:// or rediss:// url of a node'
                )
            if urlsplit(value).path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster has database 0 only: drop the /<db> part")
        if value:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError as exc:
                raise ValueError(f"not a valid URL: {exc}") from None
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return validate_tenant(value)

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenant_list(cls, value: object) -> object:
        # From the environment a list arrives as "a,b"; in TOML as an array.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for tenant in value:
            validate_tenant(tenant)
        home = info.data.get("tenant")
        if value and home is not None and home not in value:
            # The gateway's probe channel and tokenless defaults are under
            # redis.tenant: its ACL user must cover it too.
            raise ValueError(f"must include redis.tenant ({home!r})")
        return list(dict.fromkeys(value))

    @field_validator("tls_verify")
    @classmethod
    def _verify(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            _needs_tls(info)
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca(cls, value: str, info: ValidationInfo) -> str:
        if value:
            _needs_tls(info)
            _readable(value)
            try:
                ssl.create_default_context(cafile=value)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"{value} holds no usable CA certificate (PEM): {exc}") from None
        return value

    @field_validator("tls_cert_file")
    @classmethod
    def _cert(cls, value: str, info: ValidationInfo) -> str:
        if value:
            _needs_tls(info)
            _readable(value)
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _key(cls, value: str, info: ValidationInfo) -> str:
        cert = info.data.get("tls_cert_file")
        if value:
            _needs_tls(info)
            _readable(value)
            if "tls_cert_file" in info.data and not cert:
                raise ValueError("set without redis.tls_cert_file (the client certificate)")
        if not cert:
            return value
        if not value and b"PRIVATE KEY-----" not in Path(cert).read_bytes():
            raise ValueError(
                f"required with redis.tls_cert_file ({cert} holds no private key of its own)"
            )
        try:
            ssl.create_default_context().load_cert_chain(cert, value or None)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cannot load the client certificate {cert} with the key {value or cert}: "
                f"{exc} (a key that does not match the certificate, or not PEM)"
            ) from None
        return value

    @property
    def effective_url(self) -> str:
        return self.url or "redis://127.0.0.1:6379/0"


SENTINEL_SCHEME = "redis+sentinel://"


class SentinelAddress(BaseModel):
    """What a ``redis+sentinel://`` URL names: the Sentinels, the master's name, db and auth."""

    model_config = ConfigDict(frozen=True)

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def sentinel_url(url: str) -> SentinelAddress:
    """Parse ``redis+sentinel://[user:password@]host:port[,host:port...]/master_name[/db]``.

    The user and password are the master's (its ACL user); the Sentinels are
    asked without them. Raises ``ValueError`` naming what is wrong.

    >>> sentinel_url("redis+sentinel://s1:26379,s2:26379/mymaster").sentinels
    [('s1', 26379), ('s2', 26379)]
    """
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(
            f'redis.mode = "sentinel" needs a url {SENTINEL_SCHEME}host:port[,host:port...]'
            "/master_name"
        )
    rest = url[len(SENTINEL_SCHEME) :]
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, sep, pw = auth.partition(":")
        username, password = (unquote(user) or None, unquote(pw)) if sep else (None, unquote(user))
    sentinels: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {part.strip()!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    master, _, db = path.partition("/")
    if not master:
        raise ValueError("names no master: end it with /<master_name> (as in sentinel.conf)")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    return SentinelAddress(
        sentinels=sentinels,
        master=master,
        db=int(db or 0),
        username=username,
        password=password,
    )


def _needs_tls(info: ValidationInfo) -> None:
    """A TLS setting needs a rediss:// URL whose own ssl_* parameters do not also set TLS."""
    if "url" not in info.data:
        return  # the url itself is invalid and reported
    url = info.data["url"] or "redis://127.0.0.1:6379/0"
    if not url.startswith("rediss://"):
        raise ValueError(
            f"needs a rediss:// url (TLS), but redis.url is {url.split(':', 1)[0]}://: "
            "the connection would be plain text; use rediss:// or remove the setting"
        )
    params = sorted(k for k in parse_qs(urlsplit(url).query) if k.startswith("ssl_"))
    if params:
        raise ValueError(
            f"redis.url carries TLS query parameters ({', '.join(params)}) too: "
            "configure TLS in one place, preferably the [redis] tls_* settings"
        )


def _readable(path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


class GatewayConfig(_Section):
    """``[gateway]``: where a gateway listens and how it treats its clients.

    >>> GatewayConfig(port=9000, overflow_policy="close").send_queue_max
    1024
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    send_queue_max: PositiveInt = 1024
    send_queue_max_bytes: PositiveInt = 4 * 1024 * 1024
    overflow_policy: Literal["drop_oldest", "close"] = "drop_oldest"
    max_message_bytes: PositiveInt = 64 * 1024
    ping_interval: PositiveFloat = 20.0
    ping_timeout: PositiveFloat = 20.0
    probe_interval: PositiveFloat = 1.0
    probe_timeout: PositiveFloat = 2.0
    reconnect_backoff_max: PositiveFloat = 2.0
    drain_timeout: PositiveFloat = 8.0
    firehose_track_requests: PositiveInt = 4096
    max_subscriptions: PositiveInt = 256
    connect_subscribe_timeout: PositiveFloat = 10.0
    overload_lag_seconds: Annotated[float, Field(ge=0)] = 1.0
    """Lag above which the connections furthest behind are closed with 1013
    (relay/gateway/shedder.py): the event loop's, or, while not falling, the
    pub/sub reader's backlog or the delivery lag of queued events; 0: never shed."""
    overload_check_interval: PositiveFloat = 0.25
    """How often the lags are measured."""
    overload_shed_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Share of the connections with events waiting closed at each check while the
    loop lags; the least share closed when the backlogs are over the limit."""
    recent_events_bytes: Annotated[int, Field(ge=0)] = 32 * 1024 * 1024
    """Bytes of recently delivered events the process keeps to refill lagging
    clients without reading Redis (0: off; every refill reads history)."""
    recent_events_per_request: PositiveInt = 4096
    """At most this many of them per request."""
    socket_send_buffer: Annotated[int, Field(ge=0)] = 64 * 1024
    """SO_SNDBUF of every accepted socket, in bytes (0: the kernel's autotuning).

    Bounds what a client that stops reading holds in kernel memory: with
    autotuning each such socket grew to 4 MiB, and 2,000 of them pushed the
    whole machine into TCP memory pressure (every socket stalled, healthy
    clients included) before their queues' overflow policy ever applied.
    """
    ws_per_message_deflate: bool = False
    """Negotiate permessage-deflate with WebSocket clients that offer it (browsers do).

    Off by default, by measurement (docs/BENCHMARKS.md, "Fan-out"): the
    compressor runs once per socket per frame, not once per event, so it
    multiplies the CPU cost of a delivery, and each compressing socket holds
    its zlib state (tens of KiB) while idle.
    """


class HistoryConfig(_Section):
    """``[history]``: how much of each request's stream Redis keeps, and for how long.

    >>> HistoryConfig(max_events=50_000).ttl_seconds
    86400
    """

    max_events: PositiveInt = 10_000
    ttl_seconds: PositiveInt = 24 * 3600
    state_ttl_seconds: PositiveInt = 7 * 24 * 3600
    replay_batch: PositiveInt = 500


TEXT_KEEP_BYTES = 64 * 1024
"""Bytes of each agent's latest text that the publish script keeps (TEXT_KEEP in publish.lua)."""


class SnapshotConfig(_Section):
    """``[snapshot]``: what a ``snapshot`` frame carries besides the state."""

    text_max_bytes: Annotated[int, Field(ge=0, le=TEXT_KEEP_BYTES)] = 16 * 1024
    """Per agent, the latest bytes of its text so far sent in a snapshot (``texts``).

    A longer text is cut at its head (``truncated: true``): a late joiner
    continues the text with the live deltas after the snapshot, so the end
    is what joins up with what it sees next. 0 sends no text. At most 65536,
    what the publish script keeps per agent.
    """


class CancelConfig(_Section):
    """``[cancel]``: tombstone lifetime and how often orchestrators re-check them.

    >>> CancelConfig(poll_interval=0.5).tombstone_ttl_seconds
    86400
    """

    tombstone_ttl_seconds: PositiveInt = 24 * 3600
    poll_interval: PositiveFloat = 2.0


class BudgetConfig(_Section):
    """``[budget]``: default request budget, warning threshold, pause timeout.

    >>> BudgetConfig(warning_threshold=0.9, timeout_decision="continue").decision_timeout_seconds
    60.0
    """

    default_request_budget: int = 500_000
    warning_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.8
    decision_timeout_seconds: PositiveFloat = 60.0
    timeout_decision: Literal["continue", "stop"] = "stop"

    @field_validator("default_request_budget")
    @classmethod
    def _floor(cls, value: int) -> int:
        # The contract: a configured budget below 10,000 is raised to 10,000.
        if value < MIN_REQUEST_BUDGET:
            log.warning("budget.default_request_budget %d raised to %d", value, MIN_REQUEST_BUDGET)
            return MIN_REQUEST_BUDGET
        return value


class SdkConfig(_Section):
    """``[sdk]``: how the orchestrator SDK (:func:`relay.connect`) publishes.

    >>> SdkConfig(batch_window_ms=2.0, batch_max_events=128).batch_window_ms
    2.0
    """

    batch_window_ms: Annotated[float, Field(ge=0, le=10_000)] = 5.0
    """Longest time, in ms, an agent's text delta waits to share a publish with the
    deltas that follow it (0: publish as soon as the previous publish returned)."""
    batch_max_events: Annotated[int, Field(ge=1, le=10_000)] = 256
    """Events of one agent in one publish; an agent holding this many waits for the
    publish before buffering more (the buffer's overflow policy: block the producer).
    1 turns batching off."""


AUTH_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
"""Signature algorithms ``auth.jwt_algorithms`` may list (never ``none``)."""


class AuthConfig(_Section):
    """Who may connect, and how tokens are checked. See docs/SECURITY.md.

    ``mode = "jwt"`` is the default: a gateway refuses to start without a key
    (see :func:`relay.gateway.auth.Authenticator.from_config`), so running without
    authentication is always a decision written down (``mode = "none"``).
    """

    mode: Literal["none", "jwt"] = "jwt"
    jwt_secret: str = Field(default="", description="HS256 shared secret (>= 32 bytes)")
    jwt_previous_secret: str = Field(
        default="", description="also accepted while rotating jwt_secret; never used to sign"
    )
    jwt_public_key: str = Field(
        default="", description="PEM public key for RS256/ES256, or a path to a PEM file"
    )
    jwt_previous_public_key: str = ""
    jwt_algorithms: list[str] = Field(
        default_factory=list,
        description="allow-list; empty means HS256 with a secret, RS256 and ES256 with keys",
    )
    jwks_url: str = ""
    jwks_cache_seconds: PositiveFloat = 300.0
    audience: str = ""
    issuer: str = ""
    leeway_seconds: Annotated[float, Field(ge=0, le=300)] = 30.0
    max_ttl_seconds: PositiveInt = 24 * 3600
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="origins besides the gateway's own that may open sockets and call the API",
    )
    metrics_token: str = Field(
        default="", description="bearer token /metrics requires while mode is jwt"
    )

    @field_validator("jwt_algorithms", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # From the environment a list arrives as "a,b"; in TOML as an array.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        for alg in value:
            if alg not in AUTH_ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r}; choose from {AUTH_ALGORITHMS}")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"origin {origin!r} must look like https://host[:port]")
        return [o.lower() for o in value]

    @field_validator("jwt_secret", "jwt_previous_secret")
    @classmethod
    def _secret_length(cls, value: str) -> str:
        if value and len(value.encode()) < 32:
            raise ValueError("must be at least 32 bytes (use `openssl rand -hex 32`)")
        return value


class LeaseConfig(_Section):
    """``[lease]``: orchestrator liveness (relay/orchestrator/lease.py, relay/gateway/reaper.py).

    An orchestrator renews one lease every ``renew_interval`` for all of its
    requests; a lease not renewed for ``ttl_seconds`` (Redis clock) is
    expired, and a gateway's reaper, scanning every ``reap_interval``,
    declares the orchestrator lost and finishes its requests. The bound from
    the last renewal to the terminal events is about ``ttl_seconds +
    reap_interval`` plus one publish.
    """

    renew_interval: PositiveFloat = 1.0
    ttl_seconds: PositiveFloat = 5.0
    reaper: bool = True
    """Whether this gateway runs a reaper (any number may; exactly one finishes a request)."""
    reap_interval: PositiveFloat = 0.5
    reaper_redis_url: str = ""
    """The reaper's Redis URL (an ACL user of the ``reaper`` role, deploy/redis-acl/);
    empty: ``redis.url``. The other ``[redis]`` settings (TLS, timeouts) apply."""
    takeover_seconds: PositiveFloat = 30.0
    """A lost request a gateway claimed but did not finish for this long (the gateway
    died half way) is finished by another one."""
    lost_keep_seconds: PositiveInt = 24 * 3600
    """How long an orchestrator declared lost stays refused (its lease renewals)."""

    @field_validator("reaper_redis_url")
    @classmethod
    def _reaper_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _margin(self) -> LeaseConfig:
        # A lease must survive a late renewal or two (a busy event loop, one
        # slow round trip), or live orchestrators would be declared lost.
        if self.ttl_seconds < 2 * self.renew_interval:
            raise ValueError(
                f"lease.ttl_seconds ({self.ttl_seconds:g}) must be at least twice "
                f"lease.renew_interval ({self.renew_interval:g})"
            )
        return self


class SseConfig(_Section):
    """``[sse]``: the Server-Sent Events endpoint ``GET /sse/events``."""

    heartbeat_interval: PositiveFloat = 15.0
    """Seconds of silence after which a comment line is sent: proxies (HAProxy's
    ``timeout server``, nginx's ``proxy_read_timeout``) cut idle responses."""
    retry_ms: PositiveInt = 1000
    """The ``retry:`` field: how long a browser waits before reconnecting."""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class LimitsConfig(_Section):
    """What one client may cost a gateway; every limit has a default a deployment can raise.

    See docs/DEPLOYMENT.md (sizing) and docs/PROTOCOL.md (the codes a client sees).
    """

    max_connections: PositiveInt = 10_000
    """WebSocket connections per gateway process; over it: accept, then close 1013."""
    max_connections_per_subject: PositiveInt = 256
    """Per token subject (the peer address until auth gives a subject); over it: 1013."""
    header_timeout: PositiveFloat = 10.0
    """Seconds to receive a request line and all headers, from the connection (or the
    end of the previous response); then the socket is closed (408 if a request began)."""
    max_url_bytes: Annotated[int, Field(ge=256)] = 8192
    """Longest request target (path and query); longer: 414."""
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024
    """Largest request head (request line and headers); larger: 431."""
    max_pending_heads: PositiveInt = 1024
    """Sockets per process still sending their request head; over it the oldest is
    closed, so a slowloris crowd cannot reach the descriptor limit."""
    max_ws_message_bytes: PositiveInt = 128 * 1024
    """Hard ceiling of one WebSocket message, unfinished fragments included: larger
    closes with 1009 (messages over ``gateway.max_message_bytes`` and up to this
    are answered with ``frame_too_large``). Raised to that value when set lower."""
    max_message_fragments: PositiveInt = 64
    """Frames one WebSocket message may be split into; more: close 1009."""
    max_fragment_buffer_bytes: PositiveInt = 32 * 1024 * 1024
    """Bytes of unfinished fragmented messages per process; the connection whose
    fragment would pass it is closed with 1013."""
    max_body_bytes: PositiveInt = 64 * 1024
    """Largest REST request body, read incrementally; larger: 413 before parsing."""
    command_rate: PositiveFloat = 50.0
    """Frames per second a connection may send (a token bucket)..."""
    command_burst: PositiveInt = 300
    """...with this many at once (more than ``max_subscriptions``: a client may
    subscribe to all its requests at once); over it: ``rate_limited`` error frames."""
    rate_limit_strikes: PositiveInt = 100
    """Frames refused in a row after which the connection is closed 1008."""
    cancels_per_minute: PositiveInt = 120
    """Cancels per subject (WebSocket and REST together) per minute; over it: rate_limited / 429."""
    replay_bytes_per_minute: PositiveInt = 32 * 1024 * 1024
    """History bytes replayed to one connection per minute (resumes and refills)."""
    max_subscriptions: PositiveInt = 256
    """Requests (and workflow runs) one connection may subscribe to; also
    readable as ``gateway.max_subscriptions`` (the older name, still accepted)."""
    max_tracked_subjects: PositiveInt = 100_000
    """Per-subject counters kept per process (oldest idle ones forgotten first)."""


class DurableConfig(_Section):
    """``[durable]``: the Durable Streams read API (relay/gateway/durable.py, docs/PROTOCOL.md)."""

    long_poll_timeout: PositiveFloat = Field(
        default=20.0, description="seconds a live=long-poll read waits before 204"
    )
    sse_max_seconds: PositiveFloat = Field(
        default=55.0, description="a live=sse response ends after this (the client reconnects)"
    )
    heartbeat_seconds: PositiveFloat = Field(
        default=15.0, description="an SSE comment after this much silence (proxy timeouts)"
    )
    max_chunk_events: PositiveInt = 500
    max_chunk_bytes: PositiveInt = 1024 * 1024
    live_buffer: PositiveInt = Field(
        default=1024,
        description="events one live read holds; beyond, oldest dropped and refilled from history",
    )
    cursor_interval_seconds: PositiveInt = 20


class GlobalConfig(_Section):
    """All of relay's settings. Build it with :func:`load_config`.

    >>> config = load_config("config.toml")
    >>> config.redis.url, config.sdk.batch_window_ms
    """

    redis: RedisConfig = RedisConfig()
    gateway: GatewayConfig = GatewayConfig()
    history: HistoryConfig = HistoryConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    cancel: CancelConfig = CancelConfig()
    budget: BudgetConfig = BudgetConfig()
    auth: AuthConfig = AuthConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    sdk: SdkConfig = SdkConfig()
    lease: LeaseConfig = LeaseConfig()
    durable: DurableConfig = DurableConfig()
    sse: SseConfig = SseConfig()

    @model_validator(mode="before")
    @classmethod
    def _subscriptions_alias(cls, data: Any) -> Any:
        # gateway.max_subscriptions is the older name of limits.max_subscriptions:
        # either may be set, and both then read the same value.
        if not isinstance(data, dict):
            return data
        gateway, limits = data.get("gateway"), data.get("limits")
        if not isinstance(gateway, dict | type(None)) or not isinstance(limits, dict | type(None)):
            return data  # not tables: let validation name the key
        old = (gateway or {}).get("max_subscriptions")
        new = (limits or {}).get("max_subscriptions")
        if old is not None and new is not None and str(old) != str(new):
            raise ValueError(
                "gateway.max_subscriptions and limits.max_subscriptions differ; "
                "set limits.max_subscriptions only"
            )
        value = new if new is not None else old
        if value is None:
            return data
        return {
            **data,
            "gateway": {**(gateway or {}), "max_subscriptions": value},
            "limits": {**(limits or {}), "max_subscriptions": value},
        }


SECTIONS: tuple[str, ...] = tuple(GlobalConfig.model_fields)


class ConfigError(Exception):
    """The configuration is invalid; the message names the key.

    >>> load_config(environ={"RELAY_GATEWAY_PORT": "x"})
    Traceback (most recent call last):
    ConfigError: invalid configuration:
      gateway.port: Input should be a valid integer ... (in environment variable RELAY_GATEWAY_PORT)
    """


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Collect ``RELAY_<SECTION>_<KEY>`` variables as ``{section: {key: raw}}``."""
    overrides: dict[str, dict[str, str]] = {}
    origin: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "RELAY_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                overrides.setdefault(section, {})[key] = value
                origin[f"{section}.{key}"] = f"environment variable {name}"
                break
    return overrides, origin


def _format_error(exc: ValidationError, origin: Mapping[str, str], source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = origin.get(key, source)
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (in {where})")
        else:
            lines.append(f"{key}: {err['msg']} (in {where})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> GlobalConfig:
    """Load and validate the configuration once.

    ``path`` defaults to ``$RELAY_CONFIG``; with neither, only defaults and the
    environment apply. A path that was asked for but does not exist is an
    error. Raises :class:`ConfigError` naming the bad key.

    >>> config = load_config("config.toml", environ={"RELAY_REDIS_URL": "redis://r:6379/0"})
    >>> config.redis.url
    'redis://r:6379/0'
    """
    env = os.environ if environ is None else environ
    chosen = path if path is not None else env.get("RELAY_CONFIG") or None
    data: dict[str, Any] = {}
    source = "defaults"
    if chosen is not None:
        file = Path(chosen)
        source = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    overrides, origin = _env_overrides(env)
    for section, values in overrides.items():
        existing = data.get(section)
        if existing is not None and not isinstance(existing, dict):
            raise ConfigError(f"{section}: must be a table (in {source})")
        data[section] = {**(existing or {}), **values}
    try:
        return GlobalConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin, source)) from None
