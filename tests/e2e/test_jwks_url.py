"""``FAL_PROXY_JWT_JWKS_URL`` (docs/security.md, "jwt"): the keys that verify callers' JWTs
come from the URL, which must be https (http only on loopback): a JWKS served over TLS on
loopback, by a test CA the proxy's process trusts (``SSL_CERT_FILE``, as for any https
client of OpenSSL's), records every fetch."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import (
    FAL_KEY,
    ROOT,
    START_TIMEOUT,
    FakeGateway,
    RunningProxy,
    child_env,
    launch_proxy,
)
from tests.jwks_support import JwksServer

VAR = "FAL_PROXY_JWT_JWKS_URL"


def new_key(kind: str) -> Any:
    if kind == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def token(key: Any, kid: str, alg: str, sub: str = "user-1") -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def jwks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwksServer]:
    server = JwksServer(tmp_path_factory.mktemp("jwks"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jwks_proxy(fake_gateway: FakeGateway, jwks_server: JwksServer) -> Iterator[RunningProxy]:
    proxy = launch_proxy(
        fake_gateway.gateway_url,
        FAL_PROXY_AUTH="jwt",
        FAL_PROXY_JWT_JWKS_URL=jwks_server.url,
        SSL_CERT_FILE=str(jwks_server.ca_file or ""),
    )
    yield proxy
    proxy.process.stop()


def call(proxy: RunningProxy, bearer: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/emulator/echo", json={}, trust_env=False, timeout=15,
                      headers={"x-proxy-authorization": f"Bearer {bearer}"})  # fmt: skip


def test_keys_are_fetched_from_the_jwks_url(
    jwks_proxy: RunningProxy, jwks_server: JwksServer, fake_gateway: FakeGateway
) -> None:
    rsa_key, ec_key = new_key("RS256"), new_key("ES256")
    jwks_server.keys = [public_jwk(rsa_key, "rsa-1", "RS256"), public_jwk(ec_key, "ec-1", "ES256")]
    before = jwks_server.fetches
    assert call(jwks_proxy, token(rsa_key, "rsa-1", "RS256")).status_code == 200
    assert jwks_server.fetches > before  # the keys came from the URL
    assert call(jwks_proxy, token(ec_key, "ec-1", "ES256")).status_code == 200
    # A key the JWKS does not hold, under a kid it does: refused, never forwarded.
    fake_gateway.clear()
    forged = call(jwks_proxy, token(new_key("RS256"), "rsa-1", "RS256"))
    assert forged.status_code == 401 and fake_gateway.requests() == []


def test_a_key_added_to_the_jwks_is_accepted_at_once_an_unknown_kid_refetches(
    start_proxy: Any, jwks_server: JwksServer
) -> None:
    """A proxy of its own, so its first call is its first fetch: a key published right after
    a fetch verifies at once (PyJWKClient's default 30 s cooldown after every fetch refused it)."""
    proxy = start_proxy(FAL_PROXY_AUTH="jwt", FAL_PROXY_JWT_JWKS_URL=jwks_server.url,
                        SSL_CERT_FILE=str(jwks_server.ca_file or ""))  # fmt: skip
    old, new = new_key("RS256"), new_key("ES256")
    jwks_server.keys = [public_jwk(old, "old", "RS256")]
    before = jwks_server.fetches
    assert call(proxy, token(old, "old", "RS256")).status_code == 200  # the first fetch
    assert jwks_server.fetches == before + 1
    # The identity provider rotates: the new key is published, then signs.
    jwks_server.keys = [public_jwk(old, "old", "RS256"), public_jwk(new, "new", "ES256")]
    rotated = call(proxy, token(new, "new", "ES256"))
    assert jwks_server.fetches == before + 2, "the unknown kid did not make the proxy re-fetch"
    assert rotated.status_code == 200, rotated.text
    # Both keys now come from the cached set: no fetch for either.
    assert call(proxy, token(old, "old", "RS256")).status_code == 200
    assert call(proxy, token(new, "new", "ES256")).status_code == 200
    assert jwks_server.fetches == before + 2


def start_up(url: str, *command: str) -> subprocess.CompletedProcess[str]:
    env = child_env(FAL_KEY=FAL_KEY, FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/a/g/fal",
                    FAL_PROXY_AUTH="jwt", FAL_PROXY_JWT_JWKS_URL=url)  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "proxy", *command], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=START_TIMEOUT,
    )  # fmt: skip


def test_an_http_jwks_url_is_refused_at_start_up() -> None:
    refused = start_up("http://jwks.example.com/.well-known/jwks.json", "--port", "0")
    assert refused.returncode == 2
    (line,) = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert VAR in line and "https" in line
    # The documented exception: http on loopback (checked, not started).
    for loopback in ("127.0.0.1:9", "localhost:9", "[::1]:9"):
        assert start_up(f"http://{loopback}/jwks.json", "check").returncode == 0, loopback


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost.jwks.example.com/jwks.json",
        "http://127.0.0.1.jwks.example.com/jwks.json",
        "http://127.0.0.1@jwks.example.com/jwks.json",
        "http://localhost:80@jwks.example.com/jwks.json",
    ],
)
def test_an_http_url_that_only_starts_like_loopback_is_refused(url: str) -> None:
    refused = start_up(url, "check")
    assert refused.returncode == 2 and VAR in refused.stderr, refused
