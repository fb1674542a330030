"""Keys from ``FAL_PROXY_JWT_JWKS_URL`` (:class:`proxy.admission.callers.JwksKeys`): served from
the fetched set for 5 minutes, an unknown kid re-fetches at once but at most once per interval,
one fetch in flight, every fetch failure a 401.

A plain http JWKS server on loopback (allowed for the URL) counts the fetches; the cache's
clock is the module's ``monotonic``, replaced here by one the tests move by hand."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.admission import callers
from proxy.admission.callers import JwtAuth
from proxy.errors import Unauthorized
from proxy.policy.callers import JwtConfig
from tests.jwks_support import JwksServer

HEADER = "x-proxy-authorization"
LIFESPAN = callers.JWKS_LIFESPAN
INTERVAL = callers.JWKS_FORCED_REFRESH_INTERVAL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(callers, "monotonic", clock)
    return clock


class Jwks(JwksServer):
    """The plain-http endpoint, and the authenticator that reads it."""

    def auth(self) -> JwtAuth:
        return JwtAuth(JwtConfig(jwks_url=self.url), HEADER)


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    server = Jwks()
    yield server
    server.stop()


class Key:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.public = {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}

    def token(self, sub: str = "user-1", kid: str | None = None) -> str:
        claims = {"sub": sub, "exp": int(time.time()) + 600}
        return jwt.encode(claims, self.private, "ES256", headers={"kid": kid or self.kid})


async def caller(auth: JwtAuth, token: str) -> str | None:
    return await auth.authenticate(f"Bearer {token}")


async def refusal(auth: JwtAuth, token: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await caller(auth, token)
    return info.value.detail


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # one loop per test: the cache's lock belongs to it


def test_a_removed_key_stops_verifying_once_the_set_is_fetched_again(
    jwks: Jwks, clock: Clock
) -> None:
    kept, removed = Key("kept"), Key("removed")
    jwks.keys = [kept.public, removed.public]
    auth = jwks.auth()

    async def test() -> None:
        assert await caller(auth, removed.token()) == "user-1"
        assert jwks.fetches == 1
        jwks.keys = [kept.public]  # the identity provider drops the key
        clock.now += LIFESPAN - 1  # the set is still fresh: served as fetched
        assert await caller(auth, removed.token()) == "user-1"
        assert jwks.fetches == 1
        clock.now += 1  # the set's lifespan is over: fetched again, the key is gone
        assert "no key in the JWKS matches its kid" in await refusal(auth, removed.token())
        assert jwks.fetches == 2
        assert await caller(auth, kept.token()) == "user-1"
        assert jwks.fetches == 2
        for fetches in (3, 3, 3):  # the removed kid is unknown now: one forced fetch, then none
            assert await refusal(auth, removed.token())
            assert jwks.fetches == fetches

    run(test)


def test_a_removed_key_stops_verifying_at_once_after_a_forced_refetch(
    jwks: Jwks, clock: Clock
) -> None:
    kept, removed, added = Key("kept"), Key("removed"), Key("added")
    jwks.keys = [kept.public, removed.public]
    auth = jwks.auth()

    async def test() -> None:
        assert await caller(auth, removed.token()) == "user-1"
        jwks.keys = [kept.public, added.public]  # a rotation: one key out, one in
        clock.now += 1
        assert await caller(auth, added.token(sub="user-2")) == "user-2"  # an unknown kid
        assert jwks.fetches == 2
        assert await refusal(auth, removed.token())
        assert jwks.fetches == 2

    run(test)


def test_unknown_kids_force_one_refetch_per_interval(jwks: Jwks, clock: Clock) -> None:
    signer = Key("signer")
    jwks.keys = [signer.public]
    auth = jwks.auth()
    forged = iter(range(1_000_000))

    async def forge(count: int) -> None:
        tokens = [signer.token(kid=f"forged-{next(forged)}") for _ in range(count)]
        details = await asyncio.gather(*(refusal(auth, t) for t in tokens))
        assert {"no key in the JWKS matches its kid"} == set(details)

    async def test() -> None:
        assert await caller(auth, signer.token()) == "user-1"  # the first (ordinary) fetch
        assert jwks.fetches == 1
        await forge(1)  # right after an ordinary fetch: forced at once
        assert jwks.fetches == 2
        for _ in range(5):  # a storm of forged kids, one by one and many at once
            await forge(1)
            await forge(20)
            clock.now += (INTERVAL - 0.001) / 5
        assert jwks.fetches == 2, "forged kids re-fetched within the interval"
        clock.now += 0.001  # an interval after the last forced fetch
        await forge(20)  # concurrent: they share the one forced fetch
        assert jwks.fetches == 3
        await forge(20)
        assert jwks.fetches == 3
        # A real kid published now waits for the next interval...
        late = Key("late")
        jwks.keys = [signer.public, late.public]
        assert await refusal(auth, late.token())
        assert jwks.fetches == 3
        clock.now += INTERVAL
        # ...and then every request naming it at once shares one fetch, and all verify.
        callers_ = await asyncio.gather(*(caller(auth, late.token()) for _ in range(20)))
        assert callers_ == ["user-1"] * 20
        assert jwks.fetches == 4
        assert await caller(auth, signer.token()) == "user-1"
        assert jwks.fetches == 4

    run(test)


def test_one_fetch_in_flight_and_none_nor_a_thread_from_a_fresh_set(
    jwks: Jwks, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = Key("signer")
    jwks.keys = [signer.public]
    auth = jwks.auth()
    hops = 0
    to_thread = asyncio.to_thread

    async def counted(*args: Any) -> Any:
        nonlocal hops
        hops += 1
        return await to_thread(*args)

    monkeypatch.setattr(callers.asyncio, "to_thread", counted)

    async def test() -> None:
        first = await asyncio.gather(*(caller(auth, signer.token()) for _ in range(20)))
        assert first == ["user-1"] * 20
        assert (jwks.fetches, hops) == (1, 1)
        for _ in range(20):
            assert await caller(auth, signer.token()) == "user-1"
        assert (jwks.fetches, hops) == (1, 1)
        clock.now += LIFESPAN  # expired: the next requests share one fetch again
        again = await asyncio.gather(*(caller(auth, signer.token()) for _ in range(20)))
        assert again == ["user-1"] * 20
        assert (jwks.fetches, hops) == (2, 2)

    run(test)


def test_a_request_that_leaves_during_the_fetch_does_not_cut_it_short_for_the_others(
    jwks: Jwks, clock: Clock
) -> None:
    signer = Key("signer")
    jwks.keys = [signer.public]
    gate = jwks.gate = threading.Event()  # the fetch is answered when the test says
    auth = jwks.auth()

    async def test() -> None:
        first = asyncio.create_task(caller(auth, signer.token()))
        assert await asyncio.to_thread(jwks.arrived.wait, 10)  # its fetch is at the server
        second = asyncio.create_task(caller(auth, signer.token()))  # waits for that fetch
        await asyncio.sleep(0)
        first.cancel()  # the first request's client leaves
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == "user-1"
        assert jwks.fetches == 1  # the same fetch, not cut short and started again
        assert await caller(auth, signer.token()) == "user-1"
        assert jwks.fetches == 1

    run(test)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"[" * 100_000,  # nested past the parser's recursion limit
        b'{"keys": []}',
        b'{"keys": {"kty": "EC"}}',
        b'{"keys": [{"kty": "oct"}]}',  # no "k": a KeyError inside PyJWT
        b'{"keys": [{"kty": "RSA", "alg": ["RS256"]}]}',  # a TypeError inside PyJWT
        b'{"keys": [{"kty": "EC", "crv": "P-256", "x": 1, "y": 2}]}',
        b"\xff\xfe{}",
    ],
)
def test_a_jwks_that_does_not_parse_is_a_401(jwks: Jwks, clock: Clock, body: bytes) -> None:
    jwks.body = body
    auth = jwks.auth()

    async def test() -> None:
        assert "signing key unavailable" in await refusal(auth, Key("k").token())

    run(test)


def test_a_jwks_answer_over_the_cap_is_not_read_and_is_a_401(jwks: Jwks, clock: Clock) -> None:
    """The JWKS is another party's document: an answer over JWKS_MAX_BYTES is refused
    (without being read whole), one just under it is read."""
    cap = callers.JWKS_MAX_BYTES
    signer = Key("k")
    keys = json.dumps({"keys": [signer.public], "pad": ""}).encode()  # ends '"pad": ""}'

    def padded(size: int) -> bytes:
        return keys[:-2] + b"x" * (size - len(keys)) + b'"}'

    jwks.body = padded(cap + 1)
    auth = jwks.auth()

    async def test() -> None:
        refused = await refusal(auth, signer.token())
        assert "signing key unavailable" in refused
        assert f"FAL_PROXY_JWT_JWKS_URL is over {cap} bytes" in refused
        clock.now += INTERVAL  # may fetch again: the same keys, at the cap exactly
        jwks.body = padded(cap)
        assert len(jwks.body) == cap
        assert await caller(auth, signer.token()) == "user-1"

    run(test)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_jwks_answer_that_never_ends_is_cut_at_the_fetch_timeout(
    jwks: Jwks, clock: Clock, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A byte every 20 ms never trips a read's timeout; the whole fetch's deadline (the fetch
    timeout) ends it, in the headers as in the body: a 401, not callers waiting for good."""
    monkeypatch.setattr(callers, "JWKS_FETCH_TIMEOUT", 0.3)
    jwks.drip = where
    auth = jwks.auth()

    async def test() -> None:
        refused = await refusal(auth, Key("k").token())
        assert "signing key unavailable" in refused
        assert "no complete answer within 0.3 s" in refused

    run(test)


def test_a_jwks_answer_cut_short_or_mangled_is_a_401_in_a_few_printable_words(
    jwks: Jwks, clock: Clock
) -> None:
    """A body shorter than its Content-Length is no JWKS, even when what came parses; a
    mangled status line is the other party's text, which reaches callers' 401s and the log
    only as printable characters, 200 at most."""
    signer = Key("k")
    keys = json.dumps({"keys": [signer.public]}).encode()
    auth = jwks.auth()
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(keys) + 500, keys),
        b"GARBAGE\x1b[31m" + b"x" * 5000 + b"\r\n\r\n",  # echoed by the HTTP parser
    ]

    async def test() -> None:
        for answer in answers:
            jwks.raw = answer
            refused = await refusal(auth, signer.token())
            assert "signing key unavailable" in refused
            assert refused.isprintable() and len(refused) < 300, refused
            clock.now += INTERVAL  # may fetch again

    run(test)
    assert jwks.fetches == 2


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        # PyJWT would recover an RSA key's primes from "d" holding the GIL, for seconds.
        ({"d": "AQAB"}, "private key material"),
        ({"k": "c2VjcmV0"}, "private key material"),
        ({"e": "A" * 40}, "unusual size"),  # a verification as slow as the exponent is long
        ({"n": "A" * 3000}, "unusual size"),
    ],
)
def test_a_jwks_with_private_or_outsized_keys_is_not_read(
    jwks: Jwks, clock: Clock, extra: dict, said: str
) -> None:
    rsa_public = {"kty": "RSA", "kid": "r", "n": "sXch" * 64, "e": "AQAB", "use": "sig"}
    jwks.keys = [{**rsa_public, **extra}]
    auth = jwks.auth()

    async def test() -> None:
        refused = await refusal(auth, Key("r").token())
        assert "signing key unavailable" in refused and said in refused

    run(test)


def test_a_jwks_redirect_is_not_followed(jwks: Jwks, clock: Clock) -> None:
    """A 3xx from the JWKS URL is a failed fetch: the keys are never taken from elsewhere."""
    signer, elsewhere = Key("k"), JwksServer()
    elsewhere.keys = [signer.public]
    jwks.redirect = elsewhere.url
    auth = jwks.auth()

    async def test() -> None:
        assert "signing key unavailable" in await refusal(auth, signer.token())

    try:
        run(test)
        assert (jwks.fetches, elsewhere.fetches) == (1, 0)
    finally:
        elsewhere.stop()


def test_keys_with_a_kid_no_string_or_not_for_signing_verify_nothing(
    jwks: Jwks, clock: Clock
) -> None:
    listed, encrypting, signer = Key("listed"), Key("encrypting"), Key("signer")
    jwks.keys = [
        {**listed.public, "kid": ["listed"]},
        {**encrypting.public, "use": "enc"},
        signer.public,
    ]
    auth = jwks.auth()

    async def test() -> None:
        assert await caller(auth, signer.token()) == "user-1"
        assert await refusal(auth, listed.token()) == "no key in the JWKS matches its kid"
        assert await refusal(auth, encrypting.token()) == "no key in the JWKS matches its kid"

    run(test)


def test_fetch_failures_are_401s_shared_by_waiters_and_retried_after_the_interval(
    jwks: Jwks, clock: Clock
) -> None:
    signer = Key("signer")
    jwks.body = b"<html>not a JWKS</html>"
    auth = jwks.auth()

    async def test() -> None:
        details = await asyncio.gather(*(refusal(auth, signer.token()) for _ in range(10)))
        assert all("signing key unavailable: " in d for d in details)
        assert jwks.fetches == 1  # the waiters shared the failed fetch
        clock.now += INTERVAL - 0.001
        assert "signing key unavailable" in await refusal(auth, signer.token())
        assert jwks.fetches == 1  # a failing URL is not fetched again at once
        clock.now += 0.001
        jwks.body, jwks.keys = None, [signer.public]
        assert await caller(auth, signer.token()) == "user-1"
        assert jwks.fetches == 2

    run(test)


def test_an_unreachable_jwks_url_is_a_401(jwks: Jwks, clock: Clock) -> None:
    jwks.httpd.shutdown()
    jwks.httpd.server_close()  # nothing listens on the port now
    auth = jwks.auth()

    async def test() -> None:
        assert "signing key unavailable" in await refusal(auth, Key("k").token())

    run(test)


def test_a_token_without_a_kid_is_refused_with_no_fetch(jwks: Jwks, clock: Clock) -> None:
    signer = Key("signer")
    jwks.keys = [signer.public]
    auth = jwks.auth()
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 600}, signer.private, "ES256")

    async def test() -> None:
        assert "no key in the JWKS matches its kid" in await refusal(auth, token)
        assert jwks.fetches == 0

    run(test)
