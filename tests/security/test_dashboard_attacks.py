"""Hostile requests against the dashboard (docs/dashboard.md).

What is attacked: with ``FAL_PROXY_ADMIN_TOKEN`` set, the page, its files and its event
stream answer only to the token (Bearer, or HTTP Basic with the token as the password);
the dashboard is never served on the public port; the token never reaches a log line.
Each test is one attack; it passes when the defence holds. Real processes: the proxy, the
emulator as the gateway.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, launch_proxy
from tests.redis_support import free_port

ADMIN_TOKEN = "admin-SENTINEL-dash-attack-9d3b"
PATHS = ("/dashboard", "/dashboard/events", "/dashboard/static/dashboard.js")


@pytest.fixture(scope="module")
def guarded(fake_gateway: FakeGateway) -> Iterator[tuple[RunningProxy, str]]:
    port = free_port()
    proxy = launch_proxy(fake_gateway.gateway_url, FAL_PROXY_METRICS_PORT=str(port),
                         FAL_PROXY_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    yield proxy, f"http://127.0.0.1:{port}"
    proxy.process.stop()


def get(url: str, headers: list[tuple[str, str]] | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as c:
        return c.get(url, headers=headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_no_credential_is_asked_for_basic_and_shown_nothing(guarded) -> None:
    _, operator = guarded
    for path in PATHS:
        answer = get(operator + path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith('Basic realm="fal-gateway-proxy"')
        assert "text/event-stream" not in answer.headers["content-type"]
        assert "<html" not in answer.text


@pytest.mark.parametrize("authorization", [
    basic("admin", "wrong-password-0123456789"),
    basic(ADMIN_TOKEN, ""),  # the token as the user name, not the password
    basic("", ADMIN_TOKEN[:-1]),
    basic("", ADMIN_TOKEN + "x"),
    f"Bearer {ADMIN_TOKEN[:-1]}",
    f"Token {ADMIN_TOKEN}",
    f"Basic {ADMIN_TOKEN}",  # not base64 of user:password
    "Basic !!!!",
    "Bearer",
    "",
])  # fmt: skip
def test_a_wrong_credential_is_refused(guarded, authorization: str) -> None:
    _, operator = guarded
    for path in PATHS:
        assert get(operator + path, [("authorization", authorization)]).status_code == 401


def test_two_authorization_headers_are_refused_even_if_one_is_right(guarded) -> None:
    _, operator = guarded
    headers = [("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", "Bearer nope")]
    assert get(operator + "/dashboard", headers).status_code == 401


def test_a_huge_authorization_header_is_refused_not_decoded(guarded) -> None:
    proxy, operator = guarded
    for size in (2_000, 60_000):
        padded = basic("x" * size, ADMIN_TOKEN)  # the right password behind a huge user name
        answer = get(operator + "/dashboard/events", [("authorization", padded)])
        assert answer.status_code in (401, 431), answer.status_code
    assert (
        get(operator + "/dashboard", [("authorization", basic("u", ADMIN_TOKEN))]).status_code
        == 200
    )
    assert get(proxy.url + "/healthz").status_code == 200  # still serving


def test_the_right_token_opens_it_and_is_never_logged(guarded) -> None:
    proxy, operator = guarded
    for authorization in (basic("anyone", ADMIN_TOKEN), f"Bearer {ADMIN_TOKEN}"):
        assert get(operator + "/dashboard", [("authorization", authorization)]).status_code == 200
    with httpx.Client(trust_env=False, timeout=10) as c, c.stream(
        "GET", operator + "/dashboard/events", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as stream:  # fmt: skip
        assert stream.status_code == 200
        assert any(line.startswith("data: ") for line in _first_lines(stream, 3))
    get(operator + "/dashboard", [("authorization", f"Bearer {ADMIN_TOKEN}-wrong")])
    proxy.process.wait_for_json(lambda r: r.get("event") == "dashboard_refused", timeout=10)
    assert ADMIN_TOKEN not in "\n".join(proxy.process.lines)
    encoded = base64.b64encode(f"anyone:{ADMIN_TOKEN}".encode()).decode()
    assert encoded not in "\n".join(proxy.process.lines)


def test_the_dashboard_is_never_on_the_public_port(guarded) -> None:
    proxy, _ = guarded
    for path in PATHS:
        for headers in ([], [("authorization", f"Bearer {ADMIN_TOKEN}")]):
            answer = get(proxy.url + path, headers)
            assert answer.status_code != 200 or "dashboard" not in answer.text, path
            assert "text/event-stream" not in answer.headers.get("content-type", "")


def _first_lines(stream: httpx.Response, n: int) -> list[str]:
    lines = []
    for line in stream.iter_lines():
        lines.append(line)
        if len(lines) >= n:
            break
    return lines
