"""``POST /api/fal/realtime-token``: a token for the JS SDK's ``tokenProvider``, through the
same checks and counts as the proxied token call, and good for a socket straight to fal.

Real processes: the proxy under uvicorn, the emulator as the gateway and fal (its direct
``/_fal/fal.run`` path stands in for ``wss://fal.run``, where the SDK takes the token).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from websockets.asyncio.client import connect

from tests.conftest import FakeGateway, RunningProxy, launch_proxy, token_callers

TOKENS = {"alice": "alice-token-0123456789"}
ROUTE = "/api/fal/realtime-token"
LCM = "fal-ai/fast-lcm-diffusion"


@pytest.fixture(scope="module")
def proxy(fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running = launch_proxy(
        fake_gateway.gateway_url,
        **token_callers(tmp_path_factory.mktemp("token-route"), TOKENS),
        FAL_PROXY_ALLOWED_APPS=f"{LCM}/*, fal-ai/fast-sdxl",
        FAL_PROXY_QUOTAS="fal-ai/fast-sdxl=5/day",
        FAL_PROXY_TOKEN_MAX_EXPIRATION="90",
    )
    yield running
    running.process.stop()


def ask(proxy: RunningProxy, body: object, caller: str | None = "alice") -> httpx.Response:
    headers = {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"} if caller else {}
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        return c.post(ROUTE, content=json.dumps(body).encode(), headers=headers)


def test_a_token_for_the_sdks_app_path_opens_fals_socket(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    answer = ask(proxy, {"app": f"{LCM}/realtime"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"token", "expires_in"} and body["expires_in"] == 90  # the cap
    assert answer.headers["cache-control"] == "no-store"
    (sent,) = fake_gateway.requests()
    assert sent["header_map"]["x-fal-target-url"] == "https://rest.fal.ai/tokens/"
    assert json.loads(sent["body"]) == {"allowed_apps": ["fast-lcm-diffusion"],
                                        "token_expiration": 90}  # fmt: skip
    assert sent["header_map"]["authorization"].startswith("Key ")  # the proxy's key
    line = proxy.wait_for_request_log(answer.headers["x-proxy-request-id"])
    assert (line["route"], line["caller"]) == ("token", "alice")

    async def socket() -> Any:  # as the SDK does with the token: straight to fal
        url = fake_gateway.gateway_url.split("/v1/")[0].replace("http://", "ws://")
        url += f"/_fal/fal.run/{LCM}/realtime?fal_jwt_token={body['token']}"
        async with connect(url, proxy=None, open_timeout=10) as ws:
            await ws.send(msgpack.packb({"prompt": "a cat"}))
            return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))

    assert "images" in asyncio.run(socket())


@pytest.mark.parametrize(
    ("body", "caller", "status", "reason"),
    [
        ({"app": f"{LCM}/realtime"}, None, 401, None),  # the caller check
        ({"app": "fal-ai/flux/dev/realtime"}, "alice", 403, None),  # not an allowed app
        ({"app": "fal-ai/fast-sdxl/realtime"}, "alice", 429, "quota_tokens_refused"),
        ({"application": LCM}, "alice", 400, None),
    ],
)
def test_what_the_proxied_token_call_refuses_this_route_refuses(
    proxy: RunningProxy, fake_gateway: FakeGateway, body: object, caller: str | None,
    status: int, reason: str | None,
) -> None:  # fmt: skip
    answer = ask(proxy, body, caller)
    assert answer.status_code == status, answer.text
    assert answer.json()["message"] and answer.json()["detail"]
    if reason is not None:
        line = proxy.wait_for_request_log(answer.headers["x-proxy-request-id"])
        assert line["error"] == reason
    assert fake_gateway.requests() == []


def test_only_post(proxy: RunningProxy) -> None:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        answer = c.get(ROUTE)
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
