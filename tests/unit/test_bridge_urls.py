"""Where bridged sockets go, and what of the client's query travels."""

from __future__ import annotations

import pytest

from proxy.bridge_ws import without_token, gateway_ws_url, upstream_ws_url

GW = gateway_ws_url("https://gateway.ai.cloudflare.com/v1/acct/gw/fal")


def test_gateway_ws_url_follows_the_gateway_scheme() -> None:
    assert GW == "wss://gateway.ai.cloudflare.com/v1/acct/gw/fal"
    assert gateway_ws_url("http://127.0.0.1:9000/v1/a/g/fal") == "ws://127.0.0.1:9000/v1/a/g/fal"


@pytest.mark.parametrize(
    ("path", "query", "direct", "expected"),
    [
        ("/fal-ai/fast-lcm-diffusion/realtime", "", False, (f"{GW}/fal-ai/fast-lcm-diffusion/realtime", False)),
        ("/fal-ai/fast-lcm-diffusion/realtime", "max_buffering=5", True,
         ("wss://fal.run/fal-ai/fast-lcm-diffusion/realtime?max_buffering=5", True)),
        ("/fal-ai/some-app/ws", "", True, (f"{GW}/fal-ai/some-app/ws", False)),  # only realtime goes direct
    ],
)
def test_upstream_ws_url(path: str, query: str, direct: bool, expected: tuple[str, bool]) -> None:
    assert upstream_ws_url(GW, path, query, realtime_direct=direct) == expected


@pytest.mark.parametrize(
    ("query", "kept"),
    [
        ("", ""),
        ("fal_jwt_token=abc", ""),
        ("fal_jwt_token=abc&max_buffering=5", "max_buffering=5"),
        ("max_buffering=5&fal_jwt_token=abc&x=1", "max_buffering=5&x=1"),
    ],
)
def test_a_client_fal_jwt_token_never_travels_upstream(query: str, kept: str) -> None:
    assert without_token(query) == kept
