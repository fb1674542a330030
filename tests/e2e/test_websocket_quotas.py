"""What a caller runs through sockets and realtime tokens stays within their limits.

A socket runs the app once per request message, so the session counts one generation when
it opens (its first message) and each further client message one more, against the hourly
generations window and every quota of the app; the message that finds the caller's quota
or window used up never reaches fal, and the session closes with 1008 naming the limit. A
realtime token's sockets go to fal directly, where nothing could count them: a token for
an app under a quota is refused (429 naming the quota) before anything goes upstream.

Real processes: the proxy under uvicorn, the emulator as the gateway and fal (it records
every realtime message it receives as ``ws-message:<app>``), the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import FakeGateway, RunningProxy, launch_proxy, token_callers
from tests.redis_support import RedisServer

LCM = "fal-ai/fast-lcm-diffusion"
SDXL = "fal-ai/fast-sdxl"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab",
          "carol": "carol-token-0123456789a", "dave": "dave-token-0123456789ab"}  # fmt: skip
DEADLINE = 10.0

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


def caller(name: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[name]}"}


def settings(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **token_callers(tmp, TOKENS),
        # 3 LCM generations a day; 5 generations an hour of any app.
        "FAL_PROXY_QUOTAS": f"{LCM}=3/day",
        "FAL_PROXY_SUBMITS_PER_HOUR": "5",
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running = launch_proxy(fake_gateway.gateway_url, **settings(tmp_path_factory.mktemp("q")))
    yield running
    running.process.stop()


def socket(proxy: RunningProxy, app: str, who: str) -> Any:
    url = proxy.url.replace("http://", "ws://", 1) + f"/{app}/realtime"
    return connect(url, proxy=None, open_timeout=DEADLINE, close_timeout=5,
                   additional_headers=caller(who))  # fmt: skip


async def generate(ws: ClientConnection, n: int) -> dict[str, Any]:
    await ws.send(msgpack.packb({"prompt": f"frame {n}", "seed": n}))
    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), DEADLINE))
    assert isinstance(reply, dict) and "images" in reply, reply
    return reply


async def refused_close(ws: ClientConnection, n: int) -> tuple[int | None, str]:
    """Send request ``n``, which must be refused: the session closes and nothing comes back."""
    await ws.send(msgpack.packb({"prompt": f"frame {n}", "seed": n}))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), DEADLINE)
    return ws.close_code, ws.close_reason or ""


def messages_upstream(gateway: FakeGateway, app: str) -> int:
    return gateway.events().count(f"ws-message:{app}")


def usage(proxy: RunningProxy, who: str) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=DEADLINE) as c:
        answer = c.get(f"{proxy.url}/api/fal/usage", headers=caller(who))
    assert answer.status_code == 200, answer.text
    report: dict[str, Any] = answer.json()
    return report


def session_line(proxy: RunningProxy, app: str, error: str) -> dict[str, Any]:
    return proxy.process.wait_for_json(
        lambda r: (
            r.get("event") == "websocket"
            and r.get("target_path") == f"/{app}/realtime"
            and r.get("error") == error
        ),
        timeout=DEADLINE,
    )


def over_quota(proxy: RunningProxy, gateway: FakeGateway, who: str) -> None:
    """The quota of 3: one socket runs 3 generations, its 4th message closes it (1008),
    never reaching fal; the next socket is refused at the handshake."""

    async def scenario() -> tuple[int | None, str]:
        async with socket(proxy, LCM, who) as ws:
            for n in range(3):
                await generate(ws, n)
            return await refused_close(ws, 3)

    code, reason = asyncio.run(scenario())
    assert code == 1008
    assert reason.startswith("quota exceeded: 3 generations per day for fal-ai/fast-lcm-diffusion")
    assert messages_upstream(gateway, LCM) == 3
    line = session_line(proxy, LCM, "quota_exceeded")
    assert (line["generations"], line["frames_in"], line["frames_out"]) == (3, 3, 3)

    async def again() -> int:
        try:
            async with socket(proxy, LCM, who):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code
        pytest.fail("a socket over quota was accepted")

    assert asyncio.run(again()) == 429
    assert messages_upstream(gateway, LCM) == 3
    report = usage(proxy, who)
    assert [(q["apps"], q["used"], q["remaining"]) for q in report["quotas"]] == [(LCM, 3, 0)]
    assert report["usage"]["apps"][LCM]["generations"] == 3


def test_each_message_of_a_socket_counts_against_the_quota(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    over_quota(proxy, fake_gateway, "alice")


def test_each_message_counts_against_the_hourly_generations(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """No quota on SDXL: the hourly window (5) bounds the socket; the window is shared with
    HTTP generations, and reading usage is no generation."""
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
        assert c.post(f"/{SDXL}", json={"prompt": "x"}, headers=caller("bob")).status_code == 200

    async def scenario() -> tuple[int | None, str]:
        async with socket(proxy, SDXL, "bob") as ws:
            for n in range(4):  # the session's opening and 3 more: 5 with the HTTP run
                await generate(ws, n)
            return await refused_close(ws, 4)

    code, reason = asyncio.run(scenario())
    assert code == 1008 and reason.startswith("rate limit exceeded: at most 5 generations per hour")
    assert messages_upstream(fake_gateway, SDXL) == 4
    assert session_line(proxy, SDXL, "rate_limited")["generations"] == 4
    assert usage(proxy, "bob")["usage"]["apps"][SDXL]["generations"] == 5


def test_a_realtime_token_for_an_app_under_a_quota_is_refused(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    """A token for LCM (under a quota) is refused before anything goes upstream, even in a
    list with other apps; one for SDXL (no quota) is issued and counts one generation."""

    def token(apps: list[str]) -> httpx.Response:
        with httpx.Client(base_url=proxy.url, trust_env=False, timeout=DEADLINE) as c:
            return c.post(
                "/api/fal/proxy",
                headers={**caller("carol"), "x-fal-target-url": "https://rest.fal.ai/tokens/"},
                content=json.dumps({"allowed_apps": apps, "token_expiration": 120}).encode(),
            )

    for apps in (["fast-lcm-diffusion"], ["fast-sdxl", "fast-lcm-diffusion"]):
        refused = token(apps)
        assert refused.status_code == 429, refused.text
        body = refused.json()
        assert body["message"] == "realtime tokens refused under a quota"
        assert body["quota"] == {"apps": LCM, "limit": 3, "period": "day"}
        assert "3 generations per day for fal-ai/fast-lcm-diffusion" in body["detail"]
        assert "retry-after" not in refused.headers  # retrying cannot help
    assert fake_gateway.requests() == []
    issued = token(["fast-sdxl"])
    assert issued.status_code == 201, issued.text
    assert len(fake_gateway.requests()) == 1
    report = usage(proxy, "carol")
    assert report["quotas"][0]["used"] == 0
    assert report["usage"]["apps"] == {
        "realtime-tokens": {"generations": 1, "billable_units": 0.0, "spend_usd": 0.0}
    }


def test_redis_counts_each_message_too(
    fake_gateway: FakeGateway, redis_server: RedisServer, tmp_path: Path
) -> None:
    running = launch_proxy(
        fake_gateway.gateway_url,
        **settings(tmp_path, FAL_PROXY_REDIS_URL=redis_server.url),
    )
    try:
        over_quota(running, fake_gateway, "dave")  # a caller no other test counts in this Redis
    finally:
        running.process.stop()
