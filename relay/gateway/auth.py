"""Authentication and authorization: bearer tokens (JWT) and what their holder may do.

A token is a JWT signed with the gateway's HS256 secret, or with a private key
whose public half (RS256/ES256) is configured or published at a JWKS URL.
Its claims::

    sub       who holds it (logged; limits are counted per subject)
    tenant    the only tenant the holder sees and steers
    caps      a list of "view", "cancel", "decide"
    exp       expiry (required; at most auth.max_ttl_seconds after iat)
    requests  optional list of request ids: the holder may touch only these

Verification never trusts the token's header to pick a key family: an HS*
token is checked against the secrets only and an RS/ES token against the
public keys only, and only algorithms in the allow-list are tried, so
``alg: none`` and HS/RS confusion (an HS256 token "signed" with the public
key as secret) are refused. See docs/SECURITY.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.config import AuthConfig, ConfigError, GlobalConfig
from relay.wire.commands import BudgetContinue, BudgetStop, CancelAgent, Command, CommandError
from relay.wire.keys import validate_tenant

log = logging.getLogger(__name__)

CAPS = ("view", "cancel", "decide")
"""What a token can allow: receive events, cancel agents, answer budget pauses."""
MAX_TOKEN_BYTES = 8192
MAX_TOKEN_REQUESTS = 64
"""A ``requests`` claim longer than this is refused: each cancel checks every entry."""

SUBPROTOCOL = "relay.v1"
"""The subprotocol the gateway selects when the client offers it."""
BEARER_PREFIX = "relay.bearer."
"""A ``Sec-WebSocket-Protocol`` entry carrying the token (never echoed back)."""

CLOSE_POLICY = 1008
"""WebSocket close code for a missing, bad or expired token (and a refused refresh)."""
CLOSE_TOKEN_EXPIRED = 4001
"""WebSocket close code when a connection's token expires without a refresh."""

_HMAC = ("HS256", "HS384", "HS512")
JWKS_REFRESH_MIN_S = 60.0
"""Least time between two fetches of the key set caused by unknown ``kid`` s."""


class AuthError(Exception):
    """A token was refused; the message is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection or REST call acts for, and what it may do."""

    sub: str | None
    tenant: str
    caps: frozenset[str]
    requests: frozenset[str] | None = None
    """None: every request of the tenant; otherwise only these ids."""
    exp: float | None = None

    @property
    def anonymous(self) -> bool:
        """Auth is off (``mode = "none"``): every capability on the configured tenant."""
        return self.sub is None

    def can(self, cap: str) -> bool:
        """Whether the token grants ``cap``."""
        return cap in self.caps

    def may_touch(self, request_id: str) -> bool:
        """Whether ``request_id`` is within the token's ``requests`` scope."""
        return self.requests is None or request_id in self.requests

    def require(self, cap: str, request_id: str | None = None) -> None:
        """Raise ``forbidden`` unless the token grants ``cap`` (on ``request_id``)."""
        if cap not in self.caps:
            raise CommandError("forbidden", f"the token does not grant {cap!r}")
        if request_id is not None and not self.may_touch(request_id):
            raise CommandError("forbidden", f"the token does not cover request {request_id}")


def anonymous_principal(config: GlobalConfig) -> Principal:
    """The principal of every client while ``auth.mode`` is ``none``."""
    return Principal(None, config.redis.tenant, frozenset(CAPS))


def required_cap(command: Command) -> str | None:
    """The capability a state-changing command needs (None: no capability needed)."""
    if isinstance(command, CancelAgent):
        return "cancel"
    if isinstance(command, BudgetContinue | BudgetStop):
        return "decide"
    return None


def _read_key(value: str, name: str) -> str:
    """A PEM given inline, or read from the path ``value`` names."""
    if not value or value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"auth.{name}: cannot read key file {value!r}: {exc}") from None


@dataclass(slots=True)
class Authenticator:
    """Verifies tokens against the configured keys; one per gateway process."""

    config: AuthConfig
    default_tenant: str
    tenants: frozenset[str] = frozenset()
    """``redis.tenants``: the only tenants accepted (empty: any), those its Redis user covers."""
    secrets: list[str] = field(default_factory=list)
    public_keys: list[Any] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=list)
    jwks: jwt.PyJWKClient | None = None
    _jwks_refreshed: float = -JWKS_REFRESH_MIN_S - 1

    @classmethod
    def from_config(cls, config: GlobalConfig) -> Authenticator:
        """Build from ``[auth]``; raises :class:`ConfigError` when jwt mode has no key."""
        ac = config.auth
        auth = cls(ac, config.redis.tenant, frozenset(config.redis.tenants))
        if ac.mode == "none":
            return auth
        auth.secrets = [s for s in (ac.jwt_secret, ac.jwt_previous_secret) if s]
        for name in ("jwt_public_key", "jwt_previous_public_key"):
            pem = _read_key(getattr(ac, name), name)
            if not pem:
                continue
            try:
                loaded = serialization.load_pem_public_key(pem.encode())
            except ValueError as exc:
                raise ConfigError(f"auth.{name}: not a PEM public key: {exc}") from None
            if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise ConfigError(f"auth.{name}: only RSA and EC public keys are supported")
            auth.public_keys.append(loaded)
        if ac.jwks_url:
            auth.jwks = jwt.PyJWKClient(
                ac.jwks_url, cache_keys=True, lifespan=int(ac.jwks_cache_seconds), timeout=5
            )
        asymmetric = bool(auth.public_keys or auth.jwks)
        if ac.jwt_algorithms:
            auth.algorithms = list(ac.jwt_algorithms)
        else:
            auth.algorithms = (["HS256"] if auth.secrets else []) + (
                ["RS256", "ES256"] if asymmetric else []
            )
        if not auth.secrets and not asymmetric:
            raise ConfigError(
                "auth.mode is 'jwt' but none of auth.jwt_secret, auth.jwt_public_key, "
                "auth.jwks_url is set (RELAY_AUTH_JWT_SECRET); set one, or set "
                "auth.mode = 'none' to run without authentication"
            )
        for alg in auth.algorithms:
            if alg in _HMAC and not auth.secrets:
                raise ConfigError(f"auth.jwt_algorithms: {alg} listed but no auth.jwt_secret set")
            if alg not in _HMAC and not asymmetric:
                raise ConfigError(
                    f"auth.jwt_algorithms: {alg} listed but no auth.jwt_public_key or jwks_url"
                )
        return auth

    @property
    def enabled(self) -> bool:
        """Whether tokens are required."""
        return self.config.mode == "jwt"

    async def verify(self, token: str | None) -> Principal:
        """The principal a token stands for; raises :class:`AuthError` saying why not."""
        if not token:
            raise AuthError("a bearer token is required")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(f"token algorithm {alg!r} is not accepted")
        if alg in _HMAC:
            keys: list[Any] = list(self.secrets)
        else:
            # Each key only for its own family: an EC key is never tried for RS256.
            family = ec.EllipticCurvePublicKey if alg.startswith("ES") else rsa.RSAPublicKey
            keys = [k for k in self.public_keys if isinstance(k, family)]
            kid = header.get("kid")
            if self.jwks is not None and isinstance(kid, str) and kid:
                keys.append(await self._jwks_key(kid))
        claims: dict[str, Any] | None = None
        expired = False
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.config.audience or None,
                    issuer=self.config.issuer or None,
                    leeway=self.config.leeway_seconds,
                    options={"require": ["exp", "sub", "tenant"]},
                )
                break
            except jwt.ExpiredSignatureError:
                expired = True
            except jwt.InvalidSignatureError:
                continue  # the next key (rotation)
            except jwt.PyJWTError as exc:
                raise AuthError(f"token refused: {exc}") from None
        if claims is None:
            raise AuthError("token expired" if expired else "token signature is not valid")
        return self._principal(claims)

    async def _jwks_key(self, kid: str) -> Any:
        # PyJWKClient fetches with urllib (blocking): never on the event loop.
        try:
            return await asyncio.to_thread(self._jwks_lookup, kid)
        except jwt.PyJWTError as exc:
            raise AuthError(f"no key for this token in the key set: {exc}") from None

    def _jwks_lookup(self, kid: str) -> Any:
        assert self.jwks is not None
        for key in self.jwks.get_signing_keys():  # cached for jwks_cache_seconds
            if key.key_id == kid:
                return key.key
        # An unknown kid refetches the set at most once a minute: tokens with
        # made-up kids must not turn the gateway into a load on the key server.
        now = time.monotonic()
        if now - self._jwks_refreshed < JWKS_REFRESH_MIN_S:
            raise AuthError(f"no key {kid!r} in the key set")
        self._jwks_refreshed = now
        for key in self.jwks.get_signing_keys(refresh=True):
            if key.key_id == kid:
                return key.key
        raise AuthError(f"no key {kid!r} in the key set")

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        sub, tenant, caps = claims.get("sub"), claims.get("tenant"), claims.get("caps", [])
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise AuthError("claim 'sub' must be a non-empty string")
        if not isinstance(tenant, str):
            raise AuthError("claim 'tenant' must be a string")
        try:
            validate_tenant(tenant)
        except ValueError as exc:
            raise AuthError(f"claim 'tenant': {exc}") from None
        if self.tenants and tenant not in self.tenants:
            # Refused here, before the gateway subscribes to a tenant its Redis
            # user may not read (a refused SUBSCRIBE breaks the shared link).
            raise AuthError(f"tenant {tenant!r} is not served by this gateway (redis.tenants)")
        if not isinstance(caps, list) or not all(c in CAPS for c in caps):
            raise AuthError(f"claim 'caps' must be a list of {', '.join(CAPS)}")
        requests = claims.get("requests")
        scope: frozenset[str] | None = None
        if requests is not None:
            if not isinstance(requests, list) or len(requests) > MAX_TOKEN_REQUESTS:
                raise AuthError(f"claim 'requests' must be a list of at most {MAX_TOKEN_REQUESTS}")
            try:
                scope = frozenset(str(uuid.UUID(str(r))) for r in requests)
            except ValueError:
                raise AuthError("claim 'requests' must hold request ids (UUIDs)") from None
        exp = float(claims["exp"])
        iat = claims.get("iat")
        start = float(iat) if isinstance(iat, int | float) else time.time()
        if exp - start > self.config.max_ttl_seconds + self.config.leeway_seconds:
            raise AuthError(f"token lifetime exceeds {self.config.max_ttl_seconds}s")
        return Principal(sub, tenant, frozenset(caps), scope, exp)

    def metrics_allowed(self, authorization: str | None) -> bool:
        """``/metrics``: open with auth off; otherwise ``Bearer <auth.metrics_token>``."""
        if not self.enabled:
            return True
        expected = self.config.metrics_token
        token = bearer(authorization)
        return bool(expected and token and hmac.compare_digest(token, expected))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def websocket_token(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str]
) -> str | None:
    """A WebSocket token: ``Authorization``, a ``relay.bearer.`` subprotocol, or ``?token=``."""
    token = bearer(headers.get("authorization"))
    if token:
        return token
    for proto in subprotocols:
        if proto.startswith(BEARER_PREFIX) and len(proto) > len(BEARER_PREFIX):
            return proto[len(BEARER_PREFIX) :]
    return query.get("token") or None


def mint_token(
    key: str,
    *,
    tenant: str,
    caps: Iterable[str],
    sub: str,
    ttl_seconds: float,
    requests: Iterable[str] = (),
    algorithm: str = "HS256",
    audience: str = "",
    issuer: str = "",
) -> str:
    """Sign a token (the ``relay token`` command, and tests)."""
    validate_tenant(tenant)
    cap_list = list(dict.fromkeys(caps))
    for cap in cap_list:
        if cap not in CAPS:
            raise ValueError(f"unknown capability {cap!r}; choose from {', '.join(CAPS)}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "tenant": tenant,
        "caps": cap_list,
        "iat": now,
        "exp": now + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    scope = [str(uuid.UUID(r)) for r in requests]
    if scope:
        claims["requests"] = scope
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=algorithm)
