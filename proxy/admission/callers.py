"""The JWT authenticator's keys: where they come from, and the one algorithm each may verify.

The claims are checked by :func:`proxy.policy.callers.decode_claims` (pure); this module
holds what needs I/O: a JWKS file read at start-up (and again when it changes:
:mod:`proxy.app.config_reload`), or a JWKS URL (:class:`JwksKeys`).

Keys from a URL are fetched on first use and served from the fetched set for
:data:`JWKS_LIFESPAN` (5 minutes); then the set is fetched again, so a key removed from the
JWKS stops verifying within 5 minutes. A ``kid`` the set does not hold re-fetches it at once,
so a key added to the JWKS verifies at once, but such forced re-fetches happen at most once per
:data:`JWKS_FORCED_REFRESH_INTERVAL` (10 s): forged kids cannot make the proxy hammer the URL.
There is never more than one fetch in flight (the requests that wait for it share its outcome),
and the fetch (PyJWKClient's blocking I/O) runs off the event loop; a token whose key is in a
fresh set is checked with no fetch and no thread.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import jwt

from ..errors import Unauthorized
from ..policy.callers import CallerAuth, JwtConfig, bearer, decode_claims, jwt_decoder

JWKS_LIFESPAN = 300.0  # seconds a fetched JWK set is served before it is fetched again
JWKS_FORCED_REFRESH_INTERVAL = 10.0  # at least this long between re-fetches for unknown kids
JWKS_FETCH_TIMEOUT = 5.0
# A set of a few hundred keys is tens of KiB: a bigger answer is not a JWKS, and is not read.
JWKS_MAX_BYTES = 1024 * 1024
monotonic = time.monotonic  # the clock of the cache; tests replace it


def _unavailable(reason: str) -> Unauthorized:
    return Unauthorized(
        "caller token not accepted", f"signing key unavailable: {reason}", reason="caller_refused"
    )


def _no_key() -> Unauthorized:
    return Unauthorized(
        "caller token not accepted", "no key in the JWKS matches its kid", reason="caller_refused"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx itself is the answer: an error, as PyJWT's own client has it


class BoundedJwksClient(jwt.PyJWKClient):
    """PyJWT's JWKS client, but reading at most :data:`JWKS_MAX_BYTES` of the answer: the
    document is another party's, and PyJWT's own ``fetch_data`` reads it whole into memory
    whatever its size. Otherwise as PyJWT's (which documents ``fetch_data`` as the method a
    subclass overrides): no redirects, the client's timeout, TLS context and headers."""

    def fetch_data(self) -> Any:
        handlers: list[Any] = [_NoRedirect()]
        if (context := getattr(self, "ssl_context", None)) is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        request = urllib.request.Request(url=self.uri, headers=self.headers)
        try:
            with urllib.request.build_opener(*handlers).open(request, timeout=self.timeout) as r:
                body = _read_bounded(r, time.monotonic() + self.timeout)
        except (URLError, TimeoutError, http.client.HTTPException) as exc:
            if isinstance(exc, HTTPError):
                exc.close()
            raise jwt.PyJWKClientConnectionError(f"cannot fetch the JWKS: {exc}") from None
        if len(body) > JWKS_MAX_BYTES:
            raise jwt.PyJWKClientError(
                f"the answer at FAL_PROXY_JWT_JWKS_URL is over {JWKS_MAX_BYTES} bytes: not read"
            )
        return json.loads(body)


def _read_bounded(response: Any, deadline: float) -> bytes:
    """The body, up to one byte over :data:`JWKS_MAX_BYTES`, read by ``deadline`` (a
    ``time.monotonic()`` time; the read under way when it passes may take the socket's
    timeout more): the socket's timeout bounds each read, not the whole, and a server
    sending a byte now and then would otherwise hold the fetch (and every caller waiting
    for its keys) for as long as it likes."""
    body = bytearray()
    while len(body) <= JWKS_MAX_BYTES:
        chunk = response.read1(JWKS_MAX_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
        if time.monotonic() > deadline:
            raise TimeoutError("the JWKS answer took too long to arrive")
    return bytes(body)


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
        # PyJWKClient only fetches and parses (no redirects, a timeout): caching is ours.
        self._client = BoundedJwksClient(
            url, cache_keys=False, cache_jwk_set=False, timeout=JWKS_FETCH_TIMEOUT
        )
        self._lock = asyncio.Lock()  # one fetch in flight
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # the last successful fetch
        self._forced_at: float | None = None  # the last forced re-fetch (tried)
        self._failed_at: float | None = None  # the last fetch, when it failed
        self._error = ""
        self._fetches = 0  # fetches ended: a waiter sees whether one ended while it waited

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
        """Fetch and parse the set off the event loop; the lock is held by the caller."""
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
        except Exception as exc:
            # The document is another party's: besides PyJWT's own errors (PyJWKClientError,
            # PyJWKClientConnectionError, PyJWKSetError, ...), a body that is not JSON, too
            # deeply nested, cut off mid-read or shaped oddly ({"kty": "oct"} with no "k",
            # a list as "alg") raises ValueError, RecursionError, OSError, KeyError or
            # TypeError from inside PyJWT. Every one of them means "no keys": a 401, not a 500.
            self._failed_at, self._error = now, f"{type(exc).__name__}: {exc}"
            raise _unavailable(self._error) from None
        finally:
            self._fetches += 1
        self._keys = {  # signing keys with a kid (a kid that is no string names none)
            k.key_id: k
            for k in jwk_set.keys
            if isinstance(k.key_id, str) and k.key_id and k.public_key_use in ("sig", None)
        }
        self._fetched_at, self._failed_at, self._error = monotonic(), None, ""


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
