"""Caller authentication: static tokens and JWTs (HS256 secret, RS256/ES256 JWKS)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.admission.callers import JwtAuth
from proxy.errors import Unauthorized
from proxy.policy.callers import (
    JwtConfig,
    NoAuth,
    TokenAuth,
    decode_claims,
    jwt_decoder,
    load_tokens,
)

HEADER = "x-proxy-authorization"
SECRET = "s" * 40


def run(coro):
    return asyncio.run(coro)


def test_no_auth_names_nobody() -> None:
    assert run(NoAuth().authenticate(None)) is None


TOKENS = load_tokens(
    "# callers\nweb-app  tok-web-0123456789abcdef\nmobile tok-mob-0123456789abcdef\n", "f"
)


@pytest.mark.parametrize(
    ("credential", "caller"),
    [
        ("Bearer tok-web-0123456789abcdef", "web-app"),
        ("bearer tok-mob-0123456789abcdef", "mobile"),
        ("tok-mob-0123456789abcdef", "mobile"),
    ],
)
def test_static_tokens_name_their_caller(credential: str, caller: str) -> None:
    assert run(TokenAuth(TOKENS, HEADER).authenticate(credential)) == caller


@pytest.mark.parametrize(
    "credential",
    [None, "", "Bearer ", "Bearer tok-web-0123456789abcde", "tok-other-0123456789abcdef"],
)
def test_unknown_or_missing_tokens_are_401(credential: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        run(TokenAuth(TOKENS, HEADER).authenticate(credential))
    assert "tok-" not in info.value.message + info.value.detail


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no tokens"),
        ("only-one-field\n", "line 1"),
        ("a short\n", "16 characters"),
        ("a tok-0123456789abcdef\nb tok-0123456789abcdef\n", "twice"),
    ],
)
def test_bad_token_files(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        load_tokens(text, "FAL_PROXY_CLIENT_TOKENS_FILE")


def hs(claims: dict, secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def future(**claims) -> dict:
    return {"sub": "user-1", "exp": int(time.time()) + 300, **claims}


HS = JwtAuth(JwtConfig(secret=SECRET, issuer="https://app.example", audience="fal-proxy"), HEADER)


def test_hs256_session_token_names_its_subject() -> None:
    token = hs(future(iss="https://app.example", aud="fal-proxy"))
    assert run(HS.authenticate(f"Bearer {token}")) == "user-1"


@pytest.mark.parametrize(
    "claims_or_token",
    [
        future(iss="https://app.example", aud="other"),
        future(iss="https://evil.example", aud="fal-proxy"),
        {"sub": "u", "iss": "https://app.example", "aud": "fal-proxy"},  # no exp
        {
            "sub": "u",
            "iss": "https://app.example",
            "aud": "fal-proxy",
            "exp": int(time.time()) - 3600,
        },
        future(aud="fal-proxy"),  # no iss
        {"iss": "https://app.example", "aud": "fal-proxy", "exp": int(time.time()) + 300},  # no sub
        "not-a-jwt",
    ],
)
def test_bad_session_tokens_are_401(claims_or_token) -> None:
    token = claims_or_token if isinstance(claims_or_token, str) else hs(claims_or_token)
    with pytest.raises(Unauthorized):
        run(HS.authenticate(token))


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"sub": "user\ud800"}, "'sub'"),
        ({"sub": "\udfff"}, "'sub'"),
        ({"plan": "pro\udc80"}, "'plan'"),
    ],
)
def test_a_claim_with_a_lone_surrogate_names_nobody(claims: dict, named: str) -> None:
    auth = JwtAuth(JwtConfig(secret=SECRET, plan_claim="plan"), HEADER)
    with pytest.raises(Unauthorized) as refused:
        run(auth.identify(hs(future(**claims))))
    assert named in refused.value.detail
    # Any real text is a caller, whatever its script.
    assert run(auth.identify(hs(future(sub="üser-😀", plan="pro")))) == ("üser-😀", "pro")


def test_wrong_secret_and_alg_none_are_refused() -> None:
    with pytest.raises(Unauthorized):
        run(HS.authenticate(hs(future(iss="https://app.example", aud="fal-proxy"), "x" * 40)))
    unsigned = jwt.encode(
        future(iss="https://app.example", aud="fal-proxy"), None, algorithm="none"
    )
    with pytest.raises(Unauthorized):
        run(HS.authenticate(unsigned))


def test_the_secret_is_vetted_once_and_tokens_judged_as_pyjwt_judges_them() -> None:
    """The HS256 decoder with its secret prepared once answers exactly as PyJWT's own
    ``jwt.decode``, for good and bad tokens alike; and it is in use with the PyJWT installed
    (it sets PyJWT's private ``PyJWT._jws``: should an upgrade drop that, the proxy falls back
    to the plain decoder, only slower, and this test says so)."""
    config = JwtConfig(secret=SECRET, issuer="https://app.example", audience="fal-proxy")
    decoder = jwt_decoder(SECRET)
    assert type(decoder._jws.get_algorithm_by_name("HS256")).__name__ == "_PreparedSecret", (
        "the installed PyJWT no longer takes the prepared HS256 secret: see jwt_decoder"
    )
    good = future(iss="https://app.example", aud="fal-proxy")
    tokens = [
        hs(good),
        hs(good, "x" * 40),  # another secret
        hs({**good, "exp": int(time.time()) - 3600}),
        hs(future(iss="https://app.example", aud="other")),
        jwt.encode(good, None, algorithm="none"),
        jwt.encode(good, "s" * 64, algorithm="HS512"),
        "not-a-jwt",
        hs(good)[:-2],
    ]

    def judged(decoder: jwt.PyJWT | None, token: str) -> object:
        try:
            return decode_claims(token, SECRET, ["HS256"], config, decoder)
        except Unauthorized as refused:
            return (refused.message, refused.detail)

    for token in tokens:
        assert judged(decoder, token) == judged(None, token), token
    assert judged(decoder, tokens[0]) == ("user-1", None)
    # Another key through the same decoder is vetted as PyJWT vets any key.
    pem = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----\n"
    with pytest.raises(Unauthorized) as refused:
        decode_claims(tokens[0], pem, ["HS256"], config, decoder)
    assert "asymmetric key" in refused.value.detail


def jwks_file(tmp_path: Path, *keys) -> str:
    entries = []
    for kid, key in keys:
        jwk = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
            if isinstance(key, rsa.RSAPrivateKey)
            else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())
        )
        jwk["kid"] = kid
        entries.append(jwk)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


def test_rs256_and_es256_from_a_jwks_file(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = JwtAuth(
        JwtConfig(
            jwks_file=jwks_file(tmp_path, ("r1", rsa_key), ("e1", ec_key)), caller_claim="uid"
        ),
        HEADER,
    )
    claims = {"uid": "alice", "exp": int(time.time()) + 60}
    assert (
        run(auth.authenticate(jwt.encode(claims, rsa_key, "RS256", headers={"kid": "r1"})))
        == "alice"
    )
    assert (
        run(auth.authenticate(jwt.encode(claims, ec_key, "ES256", headers={"kid": "e1"})))
        == "alice"
    )
    for bad in (
        jwt.encode(claims, other, "RS256", headers={"kid": "r1"}),  # signed by someone else
        jwt.encode(claims, other, "RS256", headers={"kid": "nope"}),  # unknown kid
        hs(claims),
    ):  # HS256 where public keys are configured
        with pytest.raises(Unauthorized):
            run(auth.authenticate(bad))


@pytest.mark.parametrize(
    ("claim", "plan"),
    [("pro", "pro"), (None, None), (7, None), ({"name": "pro"}, None), (["pro"], None)],
)
def test_the_plan_claim_is_a_string_or_nothing(claim: object, plan: str | None) -> None:
    auth = JwtAuth(JwtConfig(secret=SECRET, plan_claim="plan"), HEADER)
    claims = future() if claim is None else future(plan=claim)
    assert run(auth.identify(hs(claims))) == ("user-1", plan)


def test_token_lookup_is_by_digest_for_any_number_of_callers() -> None:
    many = load_tokens(
        "".join(f"caller-{n} token-{n:012d}-abcdef\n" for n in range(20_000)), "tokens"
    )
    auth = TokenAuth(many, HEADER)
    assert run(auth.authenticate("Bearer token-000000019999-abcdef")) == "caller-19999"
    with pytest.raises(Unauthorized):
        run(auth.authenticate("Bearer token-000000019999-abcdeF"))
