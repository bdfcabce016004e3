"""Token verification: what is accepted, and every way a forged or stale token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.config import ConfigError, GlobalConfig, load_config
from relay.gateway.auth import Authenticator, AuthError, mint_token, websocket_token

SECRET = "s" * 40
OTHER = "o" * 40


def _config(**auth: Any) -> GlobalConfig:
    return GlobalConfig.model_validate({"auth": {"mode": "jwt", **auth}})


def _auth(**auth: Any) -> Authenticator:
    return Authenticator.from_config(_config(**auth))


def _mint(key: Any = SECRET, alg: str = "HS256", **over: Any) -> str:
    now = int(time.time())
    claims = {"sub": "ops", "tenant": "t1", "caps": ["view"], "iat": now, "exp": now + 60}
    claims.update(over)
    return jwt.encode(claims, key, algorithm=alg)


def _rsa() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem.decode()


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_valid_hs256_token_gives_its_principal() -> None:
    rid = str(uuid.uuid4())
    token = mint_token(
        SECRET, tenant="t1", caps=["view", "cancel"], sub="ops", ttl_seconds=60, requests=[rid]
    )
    who = await _auth(jwt_secret=SECRET).verify(token)
    assert (who.sub, who.tenant, who.caps) == ("ops", "t1", frozenset({"view", "cancel"}))
    assert who.requests == frozenset({rid}) and who.may_touch(rid)
    assert not who.may_touch(str(uuid.uuid4()))


async def test_expired_token_is_refused() -> None:
    token = _mint(exp=int(time.time()) - 120, iat=int(time.time()) - 200)
    with pytest.raises(AuthError, match="expired"):
        await _auth(jwt_secret=SECRET, leeway_seconds=0).verify(token)


async def test_tampered_token_is_refused() -> None:
    token = _mint()
    head, _, sig = token.split(".")
    forged = _b64({"sub": "ops", "tenant": "t2", "caps": ["view"], "exp": time.time() + 60})
    with pytest.raises(AuthError, match="signature"):
        await _auth(jwt_secret=SECRET).verify(f"{head}.{forged}.{sig}")
    with pytest.raises(AuthError, match="signature"):
        await _auth(jwt_secret=SECRET).verify(_mint(key=OTHER))


async def test_alg_none_is_refused() -> None:
    claims = {"sub": "ops", "tenant": "t1", "caps": ["view"], "exp": time.time() + 60}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    with pytest.raises(AuthError, match="algorithm 'none'"):
        await _auth(jwt_secret=SECRET).verify(unsigned)


async def test_hs256_signed_with_the_public_key_is_refused() -> None:
    """HS/RS confusion: the public key is public, so an HS256 token keyed with it is forged."""
    key, pem = _rsa()
    good = _mint(key=key, alg="RS256")
    auth = _auth(jwt_public_key=pem)
    assert (await auth.verify(good)).sub == "ops"
    # PyJWT itself refuses a PEM as an HMAC secret; sign the forgery by hand.
    body = jwt.decode(good, options={"verify_signature": False})
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(body)}"
    sig = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):
        await auth.verify(forged)
    # Even with HS256 allowed (a secret is configured too), the public key is never the secret.
    both = _auth(jwt_public_key=pem, jwt_secret=SECRET, jwt_algorithms=["HS256", "RS256"])
    with pytest.raises(AuthError, match="signature"):
        await both.verify(forged)


async def test_es256_key_from_a_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "pub.pem"
    path.write_bytes(pem)
    auth = _auth(jwt_public_key=str(path))
    assert (await auth.verify(_mint(key=key, alg="ES256"))).tenant == "t1"
    rs_key, _ = _rsa()
    with pytest.raises(AuthError, match="signature"):
        await auth.verify(_mint(key=rs_key, alg="RS256"))  # no RSA key configured


async def test_previous_secret_is_accepted_during_rotation() -> None:
    auth = _auth(jwt_secret=SECRET, jwt_previous_secret=OTHER)
    assert (await auth.verify(_mint(key=OTHER))).sub == "ops"
    assert (await auth.verify(_mint(key=SECRET))).sub == "ops"


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"tenant": "bad tenant!"}, "tenant"),
        ({"caps": ["view", "admin"]}, "caps"),
        ({"requests": ["not-a-uuid"]}, "requests"),
        ({"sub": ""}, "sub"),
        ({"exp": int(time.time()) + 10 * 86400}, "lifetime"),
    ],
)
async def test_bad_claims_are_refused(claims: dict[str, Any], why: str) -> None:
    with pytest.raises(AuthError, match=why):
        await _auth(jwt_secret=SECRET).verify(_mint(**claims))


async def test_missing_claims_and_audience() -> None:
    now = int(time.time())
    no_tenant = jwt.encode({"sub": "a", "exp": now + 60}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="tenant"):
        await _auth(jwt_secret=SECRET).verify(no_tenant)
    with pytest.raises(AuthError, match=r"audience|aud"):
        await _auth(jwt_secret=SECRET, audience="relay").verify(_mint())
    assert await _auth(jwt_secret=SECRET, audience="relay").verify(_mint(aud="relay"))
    with pytest.raises(AuthError, match="required"):
        await _auth(jwt_secret=SECRET).verify(None)


def test_jwt_mode_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mode = 'none'"):
        Authenticator.from_config(GlobalConfig())
    with pytest.raises(ConfigError, match="RS256 listed"):
        _auth(jwt_secret=SECRET, jwt_algorithms=["RS256"])
    assert not Authenticator.from_config(load_config(environ={"RELAY_AUTH_MODE": "none"})).enabled


def test_auth_settings_from_the_environment() -> None:
    cfg = load_config(
        environ={
            "RELAY_AUTH_MODE": "jwt",
            "RELAY_AUTH_JWT_SECRET": SECRET,
            "RELAY_AUTH_ALLOWED_ORIGINS": "https://ops.example, http://localhost:3000",
        }
    )
    assert cfg.auth.jwt_secret == SECRET
    assert cfg.auth.allowed_origins == ["https://ops.example", "http://localhost:3000"]
    with pytest.raises(ConfigError, match=r"auth.jwt_secret: .*32 bytes"):
        load_config(environ={"RELAY_AUTH_JWT_SECRET": "short"})
    with pytest.raises(ConfigError, match=r"auth\.jwt_algorithms"):
        load_config(environ={"RELAY_AUTH_JWT_ALGORITHMS": "none"})


def test_websocket_token_sources() -> None:
    assert websocket_token({"authorization": "Bearer abc"}, {}, []) == "abc"
    assert websocket_token({}, {}, ["relay.v1", "relay.bearer.xyz"]) == "xyz"
    assert websocket_token({}, {"token": "q"}, []) == "q"
    assert websocket_token({"authorization": "Basic abc"}, {}, []) is None


async def test_jwks_url_picks_the_key_by_kid() -> None:
    """Keys from a JWKS endpoint (fetched off the event loop), chosen by the token's kid."""
    import http.server
    import threading

    key, _ = _rsa()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}).encode()

    fetches: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        auth = _auth(jwks_url=f"http://127.0.0.1:{server.server_port}/jwks.json")
        good = jwt.encode(
            {"sub": "a", "tenant": "t1", "caps": ["view"], "exp": int(time.time()) + 60},
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        assert (await auth.verify(good)).tenant == "t1"
        other, _ = _rsa()
        forged = jwt.encode(
            {"sub": "a", "tenant": "t1", "caps": ["view"], "exp": int(time.time()) + 60},
            other,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        with pytest.raises(AuthError, match="signature"):
            await auth.verify(forged)
        assert len(fetches) == 1  # cached
        for i in range(5):
            unknown = jwt.encode({"sub": "a"}, other, algorithm="RS256", headers={"kid": f"x{i}"})
            with pytest.raises(AuthError, match="key set"):
                await auth.verify(unknown)
        assert len(fetches) == 2, "made-up kids refetch the key set at most once a minute"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_relay_token_mints_a_token_the_gateway_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.tools.cli import main

    monkeypatch.setenv("RELAY_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("RELAY_GATEWAY_PORT", "8123")
    rid = str(uuid.uuid4())
    argv = ["token", "--tenant", "acme", "--caps", "view,cancel", "--request", rid, "--ttl", "15m"]
    assert main([*argv, "--sub", "alice"]) == 0
    out = capsys.readouterr().out.splitlines()
    minted, url = out[0], out[1]
    assert url == f"console: http://127.0.0.1:8123/#token={minted}"
    who = await _auth(jwt_secret=SECRET).verify(minted)
    assert (who.sub, who.tenant, who.caps) == ("alice", "acme", frozenset({"view", "cancel"}))
    assert who.requests == frozenset({rid})
    assert who.exp is not None and 890 < who.exp - time.time() <= 900
    assert main(["token", "--caps", "view,admin"]) == 2
    assert "--caps: unknown capability admin" in capsys.readouterr().err
    assert main(["token", "--ttl", "3d"]) == 2
    assert "auth.max_ttl_seconds" in capsys.readouterr().err
    monkeypatch.delenv("RELAY_AUTH_JWT_SECRET")
    assert main(["token"]) == 2
    assert "no signing key" in capsys.readouterr().err


async def test_relay_token_signs_with_a_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.tools.cli import main

    key, pem = _rsa()
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert main(["token", "--private-key", str(path), "--sub", "ci"]) == 0
    minted = capsys.readouterr().out.splitlines()[0]
    assert jwt.get_unverified_header(minted)["alg"] == "RS256"
    assert (await _auth(jwt_public_key=pem).verify(minted)).sub == "ci"
    assert main(["token", "--private-key", str(tmp_path / "missing.pem")]) == 2
    assert "--private-key: cannot read" in capsys.readouterr().err
