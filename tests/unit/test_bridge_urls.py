"""Where bridged sockets go, and what of the client's query travels."""

from __future__ import annotations

import pytest

from proxy.bridge_ws import (
    caller_from_subprotocols,
    gateway_ws_url,
    is_credential_subprotocol,
    upstream_ws_url,
    without_token,
)

GW = gateway_ws_url("https://gateway.ai.cloudflare.com/v1/acct/gw/fal")


def test_gateway_ws_url_follows_the_gateway_scheme() -> None:
    assert GW == "wss://gateway.ai.cloudflare.com/v1/acct/gw/fal"
    assert gateway_ws_url("http://127.0.0.1:9000/v1/a/g/fal") == "ws://127.0.0.1:9000/v1/a/g/fal"


@pytest.mark.parametrize(
    ("path", "query", "direct", "expected"),
    [
        (
            "/fal-ai/fast-lcm-diffusion/realtime",
            "",
            False,
            (f"{GW}/fal-ai/fast-lcm-diffusion/realtime", False),
        ),
        (
            "/fal-ai/fast-lcm-diffusion/realtime",
            "max_buffering=5",
            True,
            ("wss://fal.run/fal-ai/fast-lcm-diffusion/realtime?max_buffering=5", True),
        ),
        (
            "/fal-ai/some-app/ws",
            "",
            True,
            (f"{GW}/fal-ai/some-app/ws", False),
        ),  # only realtime goes direct
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
        ("FAL_JWT_TOKEN=abc&x=1", "x=1"),
        ("fal%5Fjwt%5Ftoken=abc&x=1", "x=1"),
        ("Fal_Jwt_Token=abc&fal_jwt_token=def", ""),
        ("fal_jwt_token", ""),
        ("x=a%20b&fal_jwt_token=abc&y=c+d&z=%2F", "x=a%20b&y=c+d&z=%2F"),  # the rest byte for byte
        ("a=1&&b=2", "a=1&&b=2"),
    ],
)
def test_a_client_fal_jwt_token_never_travels_upstream(query: str, kept: str) -> None:
    assert without_token(query) == kept


@pytest.mark.parametrize(
    ("protocol", "credential"),
    [
        ("fal-api-key.x", True),
        ("Fal-Api-Key.x", True),
        ("FAL-API-KEY.x", True),
        ("cf-aig-authorization.x", True),
        ("CF-AIG-Authorization.x", True),
        ("proxy-authorization.x", True),
        ("Proxy-Authorization.x", True),
        ("v1", False),
        ("fal-api-keyx", False),
        ("msgpack", False),
    ],
)
def test_credential_subprotocols_in_any_case(protocol: str, credential: bool) -> None:
    assert is_credential_subprotocol(protocol) == credential


def test_the_caller_subprotocol_in_any_case() -> None:
    assert caller_from_subprotocols(["v1", "Proxy-Authorization.tok"]) == "tok"
    assert caller_from_subprotocols(["v1"]) is None


@pytest.mark.parametrize(
    ("gateway", "ws"),
    [
        (
            "https://gateway.ai.cloudflare.com/v1/a/g/fal",
            "wss://gateway.ai.cloudflare.com/v1/a/g/fal",
        ),
        (
            "HTTPS://gateway.ai.cloudflare.com/v1/a/g/fal",
            "wss://gateway.ai.cloudflare.com/v1/a/g/fal",
        ),
        ("http://127.0.0.1:9000/v1/a/g/fal", "ws://127.0.0.1:9000/v1/a/g/fal"),
        ("Http://127.0.0.1:9000/v1/a/g/fal", "ws://127.0.0.1:9000/v1/a/g/fal"),
    ],
)
def test_gateway_ws_url_any_scheme_case(gateway: str, ws: str) -> None:
    assert gateway_ws_url(gateway) == ws
