"""Where bridged sockets go, and what of the client's query travels."""

from __future__ import annotations

import pytest

from proxy.bridge.pump import client_close
from proxy.bridge.upstream import (
    caller_from_subprotocols,
    client_subprotocol,
    gateway_ws_url,
    is_credential_subprotocol,
    upstream_subprotocols,
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


@pytest.mark.parametrize(
    ("offered", "upstream_choice", "sent_up", "accepted"),
    [
        (["v1"], "v1", ["v1"], "v1"),
        (["fal-api-key.K", "v1"], None, ["v1"], "v1"),  # the credential stays here
        (["Proxy-Authorization.T", "msgpack", "v1"], "v1", ["msgpack", "v1"], "v1"),
        (["proxy-authorization.T"], None, [], "proxy-authorization.T"),  # only credentials: echo
        (["", "v1 ", "v1"], None, ["v1"], "v1"),  # malformed offers never go up
        ([""], None, [], None),
        ([], None, [], None),
        (["v1", "v2"], "v3", ["v1", "v2"], "v1"),  # an upstream choice not offered is not echoed
    ],
)
def test_subprotocols_up_and_back(offered, upstream_choice, sent_up, accepted) -> None:
    assert upstream_subprotocols(offered) == sent_up
    assert client_subprotocol(offered, upstream_choice) == accepted


@pytest.mark.parametrize(
    ("received", "reason", "sent", "expected"),
    [
        (1000, "bye", None, (1000, 1000, "bye")),
        (4003, "nope", None, (4003, 4003, "nope")),  # application codes relayed
        (1006, None, None, (1006, 1011, "upstream connection lost")),  # the upstream died
        (None, None, None, (None, 1011, "upstream connection lost")),
        (1005, "", None, (1005, 1000, "")),  # "no status" may not be sent: 1000
        (None, None, (1009, "message too big"), (1009, 1009, "message too big")),  # ours
        (1006, None, (1001, "idle timeout"), (1001, 1001, "idle timeout")),
        (1000, "x" * 200, None, (1000, 1000, "x" * 120)),  # a close reason fits a frame
    ],
)
def test_how_an_ended_upstream_closes_the_client(received, reason, sent, expected) -> None:
    assert client_close(received, reason, sent) == expected
