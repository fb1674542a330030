"""The JWT authenticator's keys: where they come from, and the one algorithm each may verify.

The claims are checked by :func:`proxy.policy.callers.decode_claims` (pure); this module
holds what needs I/O: a JWKS file read at start-up, or a JWKS URL fetched on first use and
when an unknown ``kid`` appears (PyJWKClient's blocking fetch, off the event loop).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt

from ..errors import Unauthorized
from ..policy.callers import CallerAuth, JwtConfig, bearer, decode_claims


class JwtAuth(CallerAuth):
    def __init__(self, config: JwtConfig, header: str) -> None:
        self.config = config
        self.header = header.encode()
        self._jwks: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if config.secret is not None:
            self.algorithms = ["HS256"]
        else:
            self.algorithms = ["RS256", "ES256"]
            if config.jwks_file is not None:
                self._jwks = jwt.PyJWKSet.from_json(
                    Path(config.jwks_file).read_text(encoding="utf-8")
                )
            else:
                # Keys are fetched on first use and cached; an unknown kid refreshes them.
                self._client = jwt.PyJWKClient(
                    config.jwks_url or "", cache_keys=True, lifespan=300, timeout=5
                )

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
                raise Unauthorized(
                    "caller token not accepted",
                    "no key in the JWKS matches its kid",
                    reason="caller_refused",
                )
        else:
            assert self._client is not None
            try:  # PyJWKClient fetches with blocking I/O: keep it off the event loop
                jwk = await asyncio.to_thread(self._client.get_signing_key_from_jwt, token)
            except jwt.PyJWKClientError as exc:
                raise Unauthorized(
                    "caller token not accepted",
                    f"signing key unavailable: {exc}",
                    reason="caller_refused",
                ) from None
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
        return decode_claims(token, key, algorithms, self.config)
