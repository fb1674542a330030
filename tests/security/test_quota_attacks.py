"""A hostile caller (or page, or upstream) against the socket, token and units counts.

What is attacked (docs/websockets.md "What a session counts", docs/quotas-and-usage.md,
docs/security.md): a bridged socket counts one generation when it opens and each client
message after its first one more, against the hourly window and the app's quotas; the
message that finds a limit used up never reaches fal and the session closes 1008; a
realtime token for an app under a quota is refused 429; billable units count once per fal
request id, per process and across replicas (a marker set NX in the Redis script).

Each test is one attack; it passes when the defence holds. Real processes: the proxy under
uvicorn, the emulator as the gateway and fal (it records ``ws-message:<app>`` for every
realtime message that reaches fal), the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.limits.base import LimitSettings
from proxy.limits.quotas import Quota
from proxy.limits.redis_backend import RedisLimiter
from tests.conftest import FakeGateway, RunningProxy, launch_proxy, token_callers
from tests.e2e.test_jwks_url import JwksServer, new_key, public_jwk
from tests.e2e.test_jwks_url import token as jwt_token
from tests.redis_support import RedisServer, free_port

LCM = "fal-ai/fast-lcm-diffusion"  # under a quota of 3 a day
SDXL = "fal-ai/fast-sdxl"  # under no quota
CALLERS = (
    "frag", "burst", "race", "ping", "closer", "paths", "proxyroute", "python", "tokens",
    "alice", "bob", "leak", "redisrace",
)  # fmt: skip
TOKENS = {name: f"{name}-secret-token-0123456789" for name in CALLERS}
DEADLINE = 10.0
PYTHON_PORT: dict[str, Any] = {}  # the module proxy's TLS port for fal-client, and its state

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def caller(name: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[name]}"}


def settings(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **token_callers(tmp, TOKENS),
        "FAL_PROXY_QUOTAS": f"{LCM}=3/day",
        "FAL_PROXY_SUBMITS_PER_HOUR": "100",
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    tmp = tmp_path_factory.mktemp("attacks")
    PYTHON_PORT["port"], PYTHON_PORT["state"] = free_port(), tmp / "state"
    running = launch_proxy(
        fake_gateway.gateway_url,
        **settings(
            tmp,
            FAL_PROXY_PYTHON_SDK_PORT=str(PYTHON_PORT["port"]),
            FAL_PROXY_STATE_DIR=str(PYTHON_PORT["state"]),
        ),
    )
    yield running
    running.process.stop()


def ws_url(proxy: RunningProxy, path: str) -> str:
    return proxy.url.replace("http://", "ws://", 1) + path


def socket(proxy: RunningProxy, who: str, path: str = f"/{LCM}/realtime") -> Any:
    return connect(ws_url(proxy, path), proxy=None, open_timeout=DEADLINE, close_timeout=5,
                   additional_headers=caller(who))  # fmt: skip


def frame(n: int) -> bytes:
    packed: bytes = msgpack.packb({"prompt": f"frame {n}", "seed": n})
    return packed


async def generate(ws: ClientConnection, n: int) -> None:
    await ws.send(frame(n))
    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), DEADLINE))
    assert isinstance(reply, dict) and "images" in reply, reply


async def burst(proxy: RunningProxy, who: str, messages: int = 5) -> int:
    """One socket sending ``messages`` at once, then reading until the session closes: how
    many replies came back (0 when the handshake was refused, 429: nothing left)."""
    try:
        async with socket(proxy, who) as ws:
            for n in range(messages):
                await ws.send(frame(n))
            return await drain(ws)
    except InvalidStatus as exc:
        assert exc.response.status_code == 429
        return 0


async def drain(ws: ClientConnection) -> int:
    """Replies until the session closes; how many."""
    replies = 0
    try:
        while True:
            await asyncio.wait_for(ws.recv(), DEADLINE)
            replies += 1
    except ConnectionClosed:
        return replies


def reached_fal(gateway: FakeGateway, app: str = LCM) -> int:
    return gateway.events().count(f"ws-message:{app}")


def usage(proxy: RunningProxy, who: str) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=DEADLINE) as c:
        answer = c.get(f"{proxy.url}/api/fal/usage", headers=caller(who))
    assert answer.status_code == 200, answer.text
    report: dict[str, Any] = answer.json()
    return report


def lcm_used(proxy: RunningProxy, who: str) -> int:
    quotas = usage(proxy, who)["quotas"]
    assert [q["apps"] for q in quotas] == [LCM]
    return int(quotas[0]["used"])


async def handshake_status(proxy: RunningProxy, who: str, path: str = f"/{LCM}/realtime") -> int:
    """101 when accepted (closed again at once), else the refusal's status."""
    try:
        async with socket(proxy, who, path):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


# --- one socket, more generations than the quota ------------------------------------------


def test_fragmented_messages_count_one_generation_each(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """Each message sent as many continuation frames is still one message: counted once,
    sent once; the 4th (fragmented too) is refused and never reaches fal."""

    async def scenario() -> tuple[int | None, int]:
        async with socket(proxy, "frag") as ws:
            for n in range(3):
                data = frame(n)
                await ws.send([data[i : i + 3] for i in range(0, len(data), 3)])
                reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), DEADLINE))
                assert "images" in reply
            data = frame(3)
            await ws.send([data[i : i + 3] for i in range(0, len(data), 3)])
            replies = await drain(ws)
            return ws.close_code, replies

    code, replies = asyncio.run(scenario())
    assert (code, replies) == (1008, 0)
    assert reached_fal(fake_gateway) == 3
    assert lcm_used(proxy, "frag") == 3


def test_a_burst_sent_before_any_count_is_answered_stops_at_the_quota(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """Twenty messages written at once (text and binary mixed, an empty one among them),
    none waiting for its count or reply: exactly 3 reach fal, then 1008."""

    async def scenario() -> tuple[int | None, int]:
        async with socket(proxy, "burst") as ws:
            for n in range(20):
                await ws.send(b"" if n == 1 else frame(n) if n % 2 else json.dumps({"n": n}))
            replies = await drain(ws)
            return ws.close_code, replies

    code, replies = asyncio.run(scenario())
    assert code == 1008
    assert reached_fal(fake_gateway) <= 3
    assert replies <= 3
    assert lcm_used(proxy, "burst") == 3


def test_parallel_sockets_racing_the_last_units_get_three_in_all(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """Eight sockets opened at once, each bursting five messages: the quota of 3 bounds them
    all together (opens and messages draw from the same count, atomically)."""

    async def scenario() -> list[int]:
        return list(await asyncio.gather(*(burst(proxy, "race") for _ in range(8))))

    replies = asyncio.run(scenario())
    assert sum(replies) <= 3
    # (a session refused at its 2nd message closes fal's side at once: its 1st may be lost)
    assert reached_fal(fake_gateway) <= 3
    assert lcm_used(proxy, "race") == 3


def test_pings_neither_count_nor_reach_fal_and_do_not_reset_the_count(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    async def scenario() -> int | None:
        async with socket(proxy, "ping") as ws:
            for n in range(3):
                for _ in range(5):
                    await asyncio.wait_for(await ws.ping(), DEADLINE)
                await generate(ws, n)
            await ws.ping()
            await ws.send(frame(3))
            await drain(ws)
            code: int | None = ws.close_code
            return code

    assert asyncio.run(scenario()) == 1008
    assert reached_fal(fake_gateway) == 3
    assert lcm_used(proxy, "ping") == 3


def test_send_then_close_at_once_still_counts_the_session(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """A socket that sends its first message and leaves at once is still a generation:
    after 3 such sockets the next handshake is refused."""

    async def scenario() -> int:
        for n in range(3):
            ws = await socket(proxy, "closer")
            await ws.send(frame(n))
            ws.transport.abort()  # no close handshake: gone under the proxy's feet
        await asyncio.sleep(0.5)
        return await handshake_status(proxy, "closer")

    assert asyncio.run(scenario()) == 429
    assert reached_fal(fake_gateway) <= 3
    assert lcm_used(proxy, "closer") == 3


# --- other socket paths, the SDK route, the Python port ------------------------------------


def test_sockets_on_other_paths_of_a_quotad_app_count_against_its_quota(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """``/<app>/ws``, the bare ``/<app>`` and the app in capitals are the same app: each
    session counts, and after three the ``/realtime`` socket is refused."""

    async def scenario() -> list[int]:
        paths = [f"/{LCM}/ws", f"/{LCM}", f"/{LCM.upper()}/realtime"]
        return [await handshake_status(proxy, "paths", p) for p in paths]

    asyncio.run(scenario())  # accepted or refused by fal: counted either way
    assert lcm_used(proxy, "paths") == 3
    assert asyncio.run(handshake_status(proxy, "paths")) == 429
    assert reached_fal(fake_gateway) == 0


def test_a_socket_on_the_sdk_proxy_route_runs_nothing_uncounted(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """The SDK route as a socket path names no app fal serves (its upstream is
    ``/fal/api/fal/proxy/...``): whatever the handshake's fate, no message reaches an app."""

    async def scenario() -> None:
        for path in ("/api/fal/proxy", f"/api/fal/proxy/{LCM}/realtime"):
            try:
                async with socket(proxy, "proxyroute", path) as ws:
                    for n in range(5):
                        await ws.send(frame(n))
                    await drain(ws)
            except (InvalidStatus, ConnectionClosed):
                pass

    asyncio.run(scenario())
    assert not [e for e in fake_gateway.events() if e.startswith("ws-message:")]


def test_sockets_on_the_python_tls_port_count_the_same(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """fal-client's port (caller credential in ``Authorization: Key``): the same counts."""
    tls = ssl.create_default_context(cafile=str(PYTHON_PORT["state"] / "ca-bundle.pem"))
    url = f"wss://127.0.0.1:{PYTHON_PORT['port']}/{LCM}/realtime"

    async def scenario() -> tuple[int | None, int]:
        async with connect(url, ssl=tls, proxy=None, open_timeout=DEADLINE,
                           additional_headers={"authorization": f"Key {TOKENS['python']}"},
                           ) as ws:  # fmt: skip
            for n in range(3):
                await generate(ws, n)
            for n in range(3, 8):
                await ws.send(frame(n))
            replies = await drain(ws)
            return ws.close_code, replies

    code, replies = asyncio.run(scenario())
    assert (code, replies) == (1008, 0)
    assert reached_fal(fake_gateway) == 3
    assert lcm_used(proxy, "python") == 3


# --- realtime tokens past the refusal -------------------------------------------------------


def token_request(proxy: RunningProxy, who: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
        return c.post(
            "/api/fal/proxy",
            headers={
                **caller(who),
                "x-fal-target-url": "https://rest.fal.ai/tokens/",
                "content-type": "application/json",
            },
            content=body,
        )


# Spellings a fal that matched aliases loosely (by owner/alias, glob, trimmed, folded) could
# read as fast-lcm-diffusion. The emulator matches exactly, as fal is believed to.
TOKEN_SPELLINGS = [
    ["fast-lcm-diffusion"],
    ["FAST-LCM-DIFFUSION"],
    ["Fast-Lcm-Diffusion"],
    ["fast-sdxl", "fast-lcm-diffusion", "fast-lcm-diffusion"],
    ["fast-sdxl", "FAST-lcm-diffusion"],
    [LCM],
    [f"{LCM}/realtime"],
    ["fast-lcm-diffusion/realtime"],
    ["*"],
    ["fast-lcm-*"],
    ["fast-lcm-diffusio?"],
    [" fast-lcm-diffusion"],
    ["fast-lcm-diffusion "],
    ["fast-lcm-diffusion\u200b"],
    ["\uff46\uff41\uff53\uff54-lcm-diffusion"],  # full-width letters
    ["fast\u2010lcm-diffusion"],  # HYPHEN, not HYPHEN-MINUS
    ["\u017fast-lcm-diffusion"],  # LATIN SMALL LETTER LONG S: "S" upper-cased, "s" by casefold
]


@pytest.mark.parametrize("apps", TOKEN_SPELLINGS, ids=[repr(a) for a in TOKEN_SPELLINGS])
def test_no_token_for_a_quotad_app_in_any_spelling(
    proxy: RunningProxy, fake_gateway: FakeGateway, apps: list[str]
) -> None:
    body = json.dumps({"allowed_apps": apps, "token_expiration": 60}).encode()
    answer = token_request(proxy, "tokens", body)
    assert answer.status_code in (400, 403, 429), (answer.status_code, answer.text)
    assert fake_gateway.requests() == []


def test_a_token_request_naming_the_apps_twice_is_refused(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """A second ``allowed_apps`` key (fal's parser might keep the last one)."""
    body = b'{"allowed_apps": ["fast-sdxl"], "allowed_apps": ["fast-lcm-diffusion"]}'
    assert token_request(proxy, "tokens", body).status_code in (400, 403, 429)
    assert fake_gateway.requests() == []


# --- billable units ---------------------------------------------------------------------


def queue(c: httpx.Client, who: str, method: str, target: str, **kw: Any) -> httpx.Response:
    return c.request(method, "/api/fal/proxy",
                     headers={**caller(who), "x-fal-target-url": target}, **kw)  # fmt: skip


def test_another_callers_fetch_does_not_swallow_a_callers_units(proxy: RunningProxy) -> None:
    """Units are deduplicated by fal request id alone, whoever fetched: bob, who learnt
    alice's request id, fetches her result first; alice's own fetch must still bill her."""
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
        submit = queue(c, "alice", "POST", f"https://queue.fal.run/{SDXL}", json={"prompt": "x"})
        assert submit.status_code == 200, submit.text
        job = submit.json()
        deadline = time.monotonic() + DEADLINE
        while queue(c, "alice", "GET", job["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stolen = queue(c, "bob", "GET", job["response_url"])
        own = queue(c, "alice", "GET", job["response_url"])
        assert own.status_code == 200
        for response in (stolen, own):
            proxy.wait_for_request_log(response.headers["x-proxy-request-id"])
    units = float(own.headers["x-fal-billable-units"])
    alice = usage(proxy, "alice")["usage"]["apps"][SDXL]
    assert alice == {"generations": 1, "billable_units": units, "spend_usd": 0.0}, (
        f"bob's fetch (status {stolen.status_code}) took alice's units: {alice}"
    )


@pytest.mark.parametrize(
    "request_id",
    ["", "\x1f", "a\x1fb\x1fc", "-", ":", "x" * 1_000_000, "é\udcff", "\x00"],
    ids=["empty", "separator", "separators", "dash", "colon", "huge", "surrogate", "nul"],
)
def test_odd_request_ids_count_once_across_replicas_and_break_nothing(
    redis_server: RedisServer, request_id: str
) -> None:
    """Two replicas (two limiters on one Redis) see the same odd fal request id: its units
    count once; another id's units still count; generations still admit."""
    prefix = f"attack-{time.time_ns()}"

    async def scenario() -> dict[str, tuple[int, float]]:
        made = [RedisLimiter(LimitSettings(redis_url=redis_server.url, key_prefix=prefix))
                for _ in range(2)]  # fmt: skip
        for limiter in made:
            await limiter.start()
        try:
            one, two = made
            await one.admit("c", submit=True, app=SDXL)
            assert await one.add_units("c", SDXL, 1.5, request_id)
            await one.flush()
            await two.add_units("c", SDXL, 1.5, request_id)
            await two.add_units("c", SDXL, 2.0, "other-id")
            await two.flush()
            await two.admit("c", submit=True, quotas=(Quota("*", 10, "day"),), app=SDXL)
            return (await two.usage("c", "default", ())).apps
        finally:
            for limiter in made:
                await limiter.close()

    # An empty id is no id: nothing to tell two answers apart by, so both count (billing
    # errs toward counting, and a hostile upstream's empty ids cannot make units vanish).
    units = 1.5 + 1.5 + 2.0 if request_id == "" else 1.5 + 2.0
    assert asyncio.run(scenario()) == {SDXL: (2, units, 0)}


# --- what a refusal tells ---------------------------------------------------------------


def test_a_refused_message_leaks_no_caller_credential(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """The close reason names the limit, not the caller; no log line holds the token."""

    async def scenario() -> str:
        async with socket(proxy, "leak") as ws:
            for n in range(6):
                await ws.send(frame(n))
            await drain(ws)
            return ws.close_reason or ""

    reason = asyncio.run(scenario())
    assert reason.startswith("quota exceeded: 3 generations per day")
    assert "leak" not in reason and TOKENS["leak"] not in reason
    line = proxy.process.wait_for_json(
        lambda r: (
            r.get("event") == "websocket"
            and r.get("caller") == "leak"
            and r.get("error") == "quota_exceeded"
        )
    )
    assert line["generations"] == 3
    assert reached_fal(fake_gateway) <= 3
    for record in proxy.process.json_lines():
        assert TOKENS["leak"] not in json.dumps(record)


# --- JWKS URL keys: a caller flooding unknown kids -----------------------------------------


def test_unknown_kids_cannot_make_the_proxy_hammer_the_jwks_url(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Sixty tokens with made-up kids (and forged algs), in parallel and in a row within a
    few seconds: every one 401, never forwarded, and at most the first fetch and one forced
    re-fetch reach the JWKS URL (one per 10 s)."""
    server = JwksServer(tmp_path)
    known = new_key("RS256")
    server.keys = [public_jwk(known, "known", "RS256")]
    running = launch_proxy(fake_gateway.gateway_url, FAL_PROXY_AUTH="jwt",
                           FAL_PROXY_JWT_JWKS_URL=server.url,
                           SSL_CERT_FILE=str(server.ca_file))  # fmt: skip
    try:
        url = f"{running.url}/{SDXL}"
        with httpx.Client(trust_env=False, timeout=DEADLINE) as c:

            def call(bearer: str) -> int:
                headers = {"x-proxy-authorization": f"Bearer {bearer}"}
                return c.post(url, json={"prompt": "x"}, headers=headers).status_code

            assert call(jwt_token(known, "known", "RS256")) == 200
            fake_gateway.clear()
            forged = [jwt_token(new_key("ES256"), f"kid-{n}", "ES256") for n in range(40)]
            forged += [jwt_token(new_key("RS256"), "known", "RS256") for _ in range(5)]
            forged += [pyjwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "s" * 32,
                                    algorithm="HS256", headers={"kid": k})
                       for k in ("known", "none", "", "../known")]  # fmt: skip
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(call, forged))
            statuses += [
                call(jwt_token(new_key("ES256"), f"again-{n}", "ES256")) for n in range(11)
            ]
    finally:
        running.process.stop()
        server.stop()
    assert set(statuses) == {401}
    assert fake_gateway.requests() == []
    assert server.fetches <= 2, f"{server.fetches} JWKS fetches"


def test_two_replicas_racing_the_last_units_through_redis_get_three_in_all(
    fake_gateway: FakeGateway, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two proxies sharing Redis, four sockets on each opened at once, each bursting five
    messages: the quota of 3 bounds them all together."""
    replicas = [
        launch_proxy(fake_gateway.gateway_url,
                     **settings(tmp_path, FAL_PROXY_REDIS_URL=redis_server.url))
        for _ in range(2)
    ]  # fmt: skip
    try:

        async def scenario() -> list[int]:
            bursts = (burst(r, "redisrace") for r in replicas for _ in range(4))
            return list(await asyncio.gather(*bursts))

        replies = asyncio.run(scenario())
        assert sum(replies) <= 3
        assert reached_fal(fake_gateway) <= 3
        assert lcm_used(replicas[0], "redisrace") == lcm_used(replicas[1], "redisrace") == 3
    finally:
        for replica in replicas:
            replica.process.stop()
