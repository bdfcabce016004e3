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
from urllib.parse import parse_qs, urlsplit

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
    """

    url: str = Field(
        default="",
        description="redis:// or rediss:// URL; empty means 127.0.0.1:6379 "
        "(`relay demo` starts its own embedded server unless a url is set)",
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

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
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
    max_events: PositiveInt = 10_000
    ttl_seconds: PositiveInt = 24 * 3600
    state_ttl_seconds: PositiveInt = 7 * 24 * 3600
    replay_batch: PositiveInt = 500


class CancelConfig(_Section):
    tombstone_ttl_seconds: PositiveInt = 24 * 3600
    poll_interval: PositiveFloat = 2.0


class BudgetConfig(_Section):
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


class GlobalConfig(_Section):
    """All of relay's settings. Build it with :func:`load_config`."""

    redis: RedisConfig = RedisConfig()
    gateway: GatewayConfig = GatewayConfig()
    history: HistoryConfig = HistoryConfig()
    cancel: CancelConfig = CancelConfig()
    budget: BudgetConfig = BudgetConfig()
    auth: AuthConfig = AuthConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()

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
    """The configuration is invalid; the message names the key."""


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
