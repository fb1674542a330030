"""Caller authentication: who is asking? (``FAL_PROXY_AUTH``)

* ``none``: nobody is asked; limits then apply per client IP. Only sensible when the
  proxy is reachable from loopback alone (the CLI warns otherwise).
* ``token``: static bearer tokens from ``FAL_PROXY_CLIENT_TOKENS_FILE``, one
  ``<caller-id> <token>`` per line, looked up by their SHA-256 digest in a dict: constant
  time whatever the number of callers, and timing says nothing useful (the dict compares
  digests, whose prefixes a caller cannot steer towards a stored token's).
* ``jwt``: the app's own session JWT, verified with PyJWT: an HS256 secret, or RS256/ES256
  public keys from a JWKS file or URL; expiry always required, issuer and audience when
  configured; the caller id is a configured claim (default ``sub``).

The credential travels in ``FAL_PROXY_AUTH_HEADER`` (default ``x-proxy-authorization``),
as ``Bearer <credential>`` or bare, never in ``Authorization``: that one is fal's, and the
proxy always drops it.

The rules are here, pure; where a JWT's keys come from (a file, a JWKS URL fetched off the
event loop) is :mod:`proxy.admission.callers`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

from ..errors import Unauthorized


class CallerAuth:
    """Base: ``authenticate`` returns the caller id, or None when auth is off."""

    header: bytes = b"x-proxy-authorization"

    async def authenticate(self, credential: str | None) -> str | None:
        return (await self.identify(credential))[0]

    async def identify(self, credential: str | None) -> tuple[str | None, str | None]:
        """(caller id, the plan the credential claims, if it can claim one)."""
        return None, None


class NoAuth(CallerAuth):
    pass


def bearer(credential: str | None, header: bytes) -> str:
    if not credential:
        raise Unauthorized(
            "caller credential missing",
            f"send it in the {header.decode()} header",
            reason="caller_missing",
        )
    value = credential.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    if not value:
        raise Unauthorized(
            "caller credential missing",
            f"the {header.decode()} header is empty",
            reason="caller_missing",
        )
    return value


def load_tokens(text: str, source: str) -> list[tuple[bytes, str]]:
    """Parse a tokens file: ``<caller-id> <token>`` per line, ``#`` comments. Raises ValueError."""
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source} line {number}: expected '<caller-id> <token>'")
        caller, token = parts
        if len(token) < 16:
            raise ValueError(f"{source} line {number}: tokens must be at least 16 characters")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise ValueError(f"{source} line {number}: the same token is listed twice")
        seen.add(digest)
        entries.append((digest, caller))
    if not entries:
        raise ValueError(f"{source} holds no tokens")
    return entries


class TokenAuth(CallerAuth):
    def __init__(self, entries: list[tuple[bytes, str]], header: str) -> None:
        self.callers = dict(entries)  # SHA-256 digest → caller id
        self.header = header.encode()

    async def identify(self, credential: str | None) -> tuple[str | None, str | None]:
        presented = hashlib.sha256(bearer(credential, self.header).encode()).digest()
        found = self.callers.get(presented)
        if found is None:
            raise Unauthorized(
                "caller token not accepted",
                "the token is not in FAL_PROXY_CLIENT_TOKENS_FILE",
                reason="caller_refused",
            )
        return found, None


@dataclass(frozen=True)
class JwtConfig:
    secret: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    caller_claim: str = "sub"
    plan_claim: str | None = None  # FAL_PROXY_JWT_PLAN_CLAIM
    leeway: float = 30.0


class _PreparedSecret(HMACAlgorithm):
    """HS256 whose configured secret is checked once, not on every token. PyJWT's
    ``HMACAlgorithm.prepare_key`` vets the key it is handed before each verification (not a
    PEM, SSH or DER key, not a JWK: it tries to parse it as JSON); for the proxy's one
    secret that is the same answer every time, and it was a quarter of a token's
    verification (callgrind: 75,000 of 297,000 instructions). Any other key is vetted as
    PyJWT always does."""

    def __init__(self, secret: str) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._secret = secret
        self._prepared = super().prepare_key(secret)  # InvalidKeyError: not usable

    def prepare_key(self, key: str | bytes) -> bytes:
        if key == self._secret:
            return self._prepared
        return super().prepare_key(key)


def hs256_secret_error(secret: str) -> str | None:
    """Why PyJWT would refuse ``secret`` as an HS256 key (it looks like an asymmetric key
    or a JWK), or None: checked at start-up, not as every caller's 401."""
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError as exc:
        return str(exc)
    except UnicodeError:  # bytes of the environment that are no UTF-8 (surrogate escapes)
        return "it is not valid UTF-8"
    return None


def jwt_decoder(secret: str | None) -> jwt.PyJWT:
    """The decoder for one configuration: with an HS256 ``secret``, one whose HS256 has the
    secret checked once (:class:`_PreparedSecret`). That is set on the decoder's own JWS
    verifier, which PyJWT does not expose (``PyJWT._jws``); a PyJWT without it, or a secret
    PyJWT refuses, gets the plain decoder, which answers the same, only slower."""
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if secret is None or not isinstance(jws, jwt.PyJWS) or "HS256" not in jws.get_algorithms():
        return decoder
    try:
        prepared = _PreparedSecret(secret)
    except (jwt.InvalidKeyError, UnicodeError):  # refused at start-up (hs256_secret_error)
        return decoder
    jws.unregister_algorithm("HS256")
    jws.register_algorithm("HS256", prepared)
    return decoder


def decode_claims(
    token: str, key: Any, algorithms: list[str], config: JwtConfig,
    decoder: jwt.PyJWT | None = None,
) -> tuple[str, str | None]:  # fmt: skip
    """Verify ``token`` with ``key`` (by ``decoder``, PyJWT's default one if None) and return
    (caller id, claimed plan); Unauthorized if it is not acceptable. Expiry is always
    required, issuer and audience when configured."""
    try:
        claims = (decoder or _DEFAULT_DECODER).decode(
            token,
            key,
            algorithms=algorithms,
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway,
            options={
                "require": [
                    "exp",
                    *(["iss"] if config.issuer else []),
                    *(["aud"] if config.audience else []),
                ]
            },
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized(
            "caller token expired", "get a fresh session token", reason="caller_refused"
        ) from None
    except jwt.PyJWTError as exc:
        # PyJWT's messages name the failed check (audience, issuer, signature), never the token.
        raise Unauthorized("caller token not accepted", str(exc), reason="caller_refused") from None
    except (TypeError, ValueError, RecursionError):
        # Whatever else a hostile token makes the decoder trip on is still a bad token.
        raise Unauthorized(
            "caller token not accepted", "not a valid JWT", reason="caller_refused"
        ) from None
    caller = claims.get(config.caller_claim)
    if not isinstance(caller, (str, int)) or caller == "":
        raise Unauthorized(
            "caller token not accepted",
            f"the token has no '{config.caller_claim}' claim",
            reason="caller_refused",
        )
    plan = claims.get(config.plan_claim) if config.plan_claim else None
    caller, plan = str(caller), plan if isinstance(plan, str) else None
    # JSON can spell a lone surrogate ("\ud800"), which is no text: it could not be hashed
    # into the gateway metadata nor written to the log line. Such a claim names nobody.
    for name, value in ((config.caller_claim, caller), (config.plan_claim, plan)):
        if value is not None and not _is_text(value):
            raise Unauthorized(
                "caller token not accepted",
                f"the '{name}' claim is not valid Unicode text",
                reason="caller_refused",
            )
    return caller, plan


_DEFAULT_DECODER = jwt.PyJWT()


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
