"""The JWT authenticator's keys: where they come from, and the one algorithm each may verify.

The claims are checked by :func:`proxy.policy.callers.decode_claims` (pure); this module
holds what needs I/O: a JWKS file read at start-up (and again when it changes:
:mod:`proxy.app.config_reload`), or a JWKS URL (:class:`JwksKeys`).

Keys from a URL are fetched on first use and served from the fetched set for
:data:`JWKS_LIFESPAN` (5 minutes); then the set is fetched again, so a key removed from the
JWKS stops verifying within 5 minutes. A ``kid`` the set does not hold re-fetches it at once,
so a key added to the JWKS verifies at once, but such forced re-fetches happen at most once per
:data:`JWKS_FORCED_REFRESH_INTERVAL` (10 s): forged kids cannot make the proxy hammer the URL.
There is never more than one fetch in flight (the requests that wait for it share its outcome,
and one that leaves meanwhile does not cut it short for the others).
The JWKS is another party's document: a fetch (httpx, on the event loop) follows no redirect,
reads at most :data:`JWKS_MAX_BYTES` and ends within :data:`JWKS_FETCH_TIMEOUT` in all, however
slowly the answer comes; the keys are parsed off the event loop (a thread). A token whose key is
in a fresh set is checked with no fetch and no thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

from ..errors import Unauthorized
from ..observe.logs import get_logger
from ..policy.callers import CallerAuth, JwtConfig, bearer, decode_claims, jwt_decoder

JWKS_LIFESPAN = 300.0  # seconds a fetched JWK set is served before it is fetched again
JWKS_FORCED_REFRESH_INTERVAL = 10.0  # at least this long between re-fetches for unknown kids
JWKS_FETCH_TIMEOUT = 5.0  # seconds for a whole fetch: connecting, the headers, the body
# A set of a few hundred keys is tens of KiB: a bigger answer is not a JWKS, and is not read.
JWKS_MAX_BYTES = 1024 * 1024
monotonic = time.monotonic  # the clock of the cache; tests replace it
log = get_logger("proxy.auth")


def _unavailable(reason: str) -> Unauthorized:
    return Unauthorized(
        "caller token not accepted", f"signing key unavailable: {reason}", reason="caller_refused"
    )


def _no_key() -> Unauthorized:
    return Unauthorized(
        "caller token not accepted", "no key in the JWKS matches its kid", reason="caller_refused"
    )


class JwksFetchError(Exception):
    """The JWKS URL's answer is not a JWKS the proxy will read."""


async def download_jwks(url: str) -> bytes:
    """The answer at ``url``, within :data:`JWKS_FETCH_TIMEOUT` in all: a 2xx, no redirect
    followed, at most :data:`JWKS_MAX_BYTES` bytes, never decompressed (an answer that is
    compressed anyway does not parse: a gzip bomb stays small)."""
    try:
        async with asyncio.timeout(JWKS_FETCH_TIMEOUT):
            client = httpx.AsyncClient(
                # The system's CA store (SSL_CERT_FILE honoured), as for the gateway; no
                # proxy or .netrc from the environment.
                verify=_tls_context(), trust_env=False, follow_redirects=False,
                timeout=JWKS_FETCH_TIMEOUT,
            )  # fmt: skip
            async with client:
                headers = {"accept": "application/json", "accept-encoding": "identity"}
                async with client.stream("GET", url, headers=headers) as response:
                    if not 200 <= response.status_code < 300:
                        raise JwksFetchError(f"the answer is HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body += chunk
                        # A body in tiny pieces that are all there already is read without
                        # a pause: give the loop's other work its turn between them.
                        await asyncio.sleep(0)
                        if len(body) > JWKS_MAX_BYTES:
                            raise JwksFetchError(
                                "the answer at FAL_PROXY_JWT_JWKS_URL is over "
                                f"{JWKS_MAX_BYTES} bytes: not read"
                            )
    except TimeoutError:
        raise JwksFetchError(f"no complete answer within {JWKS_FETCH_TIMEOUT:g} s") from None
    return bytes(body)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # built once: loading the CA store takes ~50 ms


# Members only a private key has: a JWKS for verifying holds public keys. PyJWT would take
# an RSA key with "d" and no primes, and recover the primes holding the GIL for as long as
# the numbers make it (seconds for an 8 KB document), every request waiting.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# An RSA modulus of at most 16,384 bits and an exponent of at most 48 bits (65537 is
# "AQAB"), in base64url: a verification with a huge exponent takes as long as it likes.
_MAX_N, _MAX_E = 2731, 8


def parse_jwks(body: bytes) -> jwt.PyJWKSet:
    """The key set in a JWKS document (any JSON encoding, as PyJWT reads it): public keys
    of sane sizes only (a hostile set would otherwise cost seconds on every fetch or
    verification)."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise JwksFetchError("the answer is not a JSON object")
    for key in data.get("keys") or ():
        if not isinstance(key, dict):
            continue  # PyJWT refuses it
        if _PRIVATE_MEMBERS & key.keys():
            raise JwksFetchError("the JWKS holds private key material: not read")
        n, e = key.get("n", ""), key.get("e", "")
        if not isinstance(n, str) or not isinstance(e, str) or len(n) > _MAX_N or len(e) > _MAX_E:
            raise JwksFetchError("the JWKS holds an RSA key of unusual size: not read")
    return jwt.PyJWKSet.from_dict(data)


def describe_failure(exc: BaseException) -> str:
    """A fetch's failure in a few printable words: it is in callers' 401s and the log, and
    the text of some errors is the other party's (a status line, a header)."""
    text = "".join(c if c.isprintable() else " " for c in f"{type(exc).__name__}: {exc}")
    return text if len(text) <= 200 else text[:199] + "…"


class JwksKeys:
    """The signing keys at a JWKS URL, by ``kid``, from the set fetched last (never from a
    per-key cache, which would keep a removed key for good).

    A fetch happens when the set is missing or older than :data:`JWKS_LIFESPAN` (but not
    sooner than :data:`JWKS_FORCED_REFRESH_INTERVAL` after a failed one), or when a ``kid`` is
    not in a fresh set and no forced re-fetch happened in the last
    :data:`JWKS_FORCED_REFRESH_INTERVAL` (measured from the last forced re-fetch, not from
    ordinary ones, so a key published just after a fetch still verifies at once).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = asyncio.Lock()  # one fetch in flight
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # the last successful fetch
        self._forced_at: float | None = None  # the last forced re-fetch (tried)
        self._failed_at: float | None = None  # the last fetch, when it failed
        self._error = ""
        self._fetches = 0  # fetches ended: a waiter sees whether one ended while it waited
        # The fetch in flight: a task of its own, so a request that leaves while it runs
        # (its task cancelled) does not take the fetch with it; the next waiter joins it.
        self._fetching: asyncio.Task[str | None] | None = None

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < JWKS_LIFESPAN

    async def key(self, kid: str | None) -> jwt.PyJWK:
        if kid is None:  # every key taken from a JWKS URL has a kid: none can match
            raise _no_key()
        if self._fresh(monotonic()) and kid in self._keys:  # the usual case: no lock, no thread
            return self._keys[kid]
        seen = self._fetches
        async with self._lock:
            fetched = self._fetches != seen  # a fetch ended while this request waited
            if fetched and self._failed_at is not None:
                raise _unavailable(self._error)  # share its failure, do not repeat it at once
            now = monotonic()
            if not self._fresh(now):
                if self._failed_at is not None and (
                    now - self._failed_at < JWKS_FORCED_REFRESH_INTERVAL
                ):
                    raise _unavailable(self._error)
                await self._fetch(now)
                fetched = True
            if kid not in self._keys and not fetched and self._may_force(now):
                self._forced_at = now
                await self._fetch(now)
            if kid not in self._keys:
                raise _no_key()
            return self._keys[kid]

    def _may_force(self, now: float) -> bool:
        return self._forced_at is None or now - self._forced_at >= JWKS_FORCED_REFRESH_INTERVAL

    async def _fetch(self, now: float) -> None:
        """Wait for the fetch in flight, starting it if there is none (the lock is held by
        the caller); a 401 if it failed."""
        if self._fetching is None:
            self._fetching = asyncio.get_running_loop().create_task(self._fetch_once(now))
        error = await asyncio.shield(self._fetching)
        if error is not None:
            raise _unavailable(error)

    async def _fetch_once(self, now: float) -> str | None:
        """Fetch the set and parse it off the event loop: None, or what failed."""
        try:
            jwk_set = await asyncio.to_thread(parse_jwks, await download_jwks(self._url))
        except Exception as exc:
            # The document is another party's: besides the fetch's own failures, a body
            # that is not JSON, too deeply nested or shaped oddly ({"kty": "oct"} with no
            # "k", a list as "alg") raises PyJWT's errors, ValueError, RecursionError,
            # KeyError or TypeError from inside PyJWT. Every one of them means "no keys": a
            # 401, not a 500.
            self._failed_at, self._error = now, describe_failure(exc)
            hint = "check FAL_PROXY_JWT_JWKS_URL: callers' tokens are refused meanwhile"
            log.warning("jwks_fetch_failed", error=self._error, hint=hint)
            return self._error
        else:
            self._keys = {  # signing keys with a kid (a kid that is no string names none)
                k.key_id: k
                for k in jwk_set.keys
                if isinstance(k.key_id, str) and k.key_id and k.public_key_use in ("sig", None)
            }
            self._fetched_at, self._failed_at, self._error = monotonic(), None, ""
            return None
        finally:
            self._fetches += 1
            self._fetching = None


def load_jwks(text: str, source: str) -> jwt.PyJWKSet:
    """A JWKS file's keys, as start-up reads them; ValueError naming ``source``."""
    try:
        return jwt.PyJWKSet.from_json(text)
    except (ValueError, jwt.PyJWTError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(f"{source}: not a usable JWKS: {exc}") from None


class JwtAuth(CallerAuth):
    def __init__(self, config: JwtConfig, header: str) -> None:
        self.config = config
        self.header = header.encode()
        self._jwks: jwt.PyJWKSet | None = None
        self._url_keys: JwksKeys | None = None
        self.decoder = jwt_decoder(config.secret)
        if config.secret is not None:
            self.algorithms = ["HS256"]
        else:
            self.algorithms = ["RS256", "ES256"]
            if config.jwks_file is not None:
                self._jwks = jwt.PyJWKSet.from_json(
                    Path(config.jwks_file).read_text(encoding="utf-8")
                )
            else:
                self._url_keys = JwksKeys(config.jwks_url or "")

    def use_jwks(self, jwks: jwt.PyJWKSet) -> None:
        """The JWKS file's keys, re-read (:mod:`proxy.app.config_reload`): one assignment, so
        a key removed stops verifying at the next token; a token being checked keeps its key."""
        self._jwks = jwks

    async def _key(self, token: str) -> tuple[Any, list[str]]:
        """The key to verify ``token`` with, and the one algorithm that key may verify.

        A JWKS key verifies only its own algorithm (RSA: RS256, EC: ES256), whatever the
        token's header claims: an ``ES256`` header naming an RSA key's ``kid`` is refused,
        not handed to the wrong verifier (which raised ``TypeError``).
        """
        if self.config.secret is not None:
            return self.config.secret, self.algorithms
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Unauthorized(
                "caller token not accepted", "not a JWT", reason="caller_refused"
            ) from None
        jwk: jwt.PyJWK | None = None
        if self._jwks is not None:
            jwk = next((k for k in self._jwks.keys if kid is None or k.key_id == kid), None)
            if jwk is None:
                raise _no_key()
        else:
            assert self._url_keys is not None
            jwk = await self._url_keys.key(kid)
        algorithm = jwk.algorithm_name
        if algorithm not in self.algorithms:
            raise Unauthorized(
                "caller token not accepted",
                f"the JWKS key is for {algorithm}, not RS256/ES256",
                reason="caller_refused",
            )
        return jwk.key, [algorithm]

    async def identify(self, credential: str | None) -> tuple[str | None, str | None]:
        token = bearer(credential, self.header)
        key, algorithms = await self._key(token)
        return decode_claims(token, key, algorithms, self.config, self.decoder)
