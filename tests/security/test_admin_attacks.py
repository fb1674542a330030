"""Hostile requests against the admin API (docs/admin.md).

What is attacked: the admin API is served on the operator's port only, only with
``FAL_PROXY_ADMIN_TOKEN`` set, and only to ``Authorization: Bearer <token>``; a caller id
in its path may hold any character a caller id holds (slashes, escapes, non-ASCII, a
great length) and names exactly that caller; bad input is a 4xx JSON answer, never a 500.
Each test is one attack; it passes when the defence holds. Real processes: the proxy, the
emulator as the gateway.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from proxy.limits.admin_ops import encode_cursor
from tests.conftest import (
    FAL_KEY,
    FakeGateway,
    RunningProxy,
    child_env,
    launch_proxy,
    token_callers,
)
from tests.redis_support import RedisServer, free_port

ADMIN_TOKEN = "admin-SENTINEL-token-c0ffee-1234"
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
TOKENS = {
    "team/alice": "alice-token-0123456789",
    "ünï☃": "unicode-token-0123456789",
    "plain": "plain-token-0123456789ab",
    "%2F": "escape-token-0123456789a",
}


class Ports:
    def __init__(self, proxy: RunningProxy, metrics_port: int) -> None:
        self.proxy = proxy
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", trust_env=False,
                                  timeout=10, headers=AUTH)  # fmt: skip
        self.public = httpx.Client(base_url=proxy.url, trust_env=False, timeout=10)

    def run(self, caller: str) -> int:
        headers = {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"}
        answer = self.public.post("/fal-ai/fast-sdxl", json={"prompt": "x"}, headers=headers)
        return answer.status_code

    def close(self) -> None:
        self.admin.close()
        self.public.close()


def launch(fake_gateway: FakeGateway, directory: Path, **extra: str) -> tuple[RunningProxy, int]:
    port = free_port()
    env = {**token_callers(directory, TOKENS), "FAL_PROXY_METRICS_PORT": str(port),
           "FAL_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, **extra}  # fmt: skip
    proxy = launch_proxy(fake_gateway.gateway_url, **env)
    return proxy, port


@pytest.fixture(scope="module")
def ports(fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    proxy, port = launch(fake_gateway, tmp_path_factory.mktemp("admin"))
    running = Ports(proxy, port)
    yield running
    running.close()
    proxy.process.stop()


def assert_json_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"message", "detail"}, body
    return dict(body)


def test_admin_paths_on_the_public_port_are_not_served(
    ports: Ports, fake_gateway: FakeGateway
) -> None:
    paths = [("POST", "/admin/callers/plain/block"), ("GET", "/admin/callers"),
             ("POST", "/api/fal/proxy/admin/callers/plain/block")]  # fmt: skip
    as_caller = {"x-proxy-authorization": f"Bearer {TOKENS['plain']}"}
    for method, path in paths:
        for headers in (AUTH, {**AUTH, **as_caller}):
            answer = ports.public.request(method, path, headers=headers)
            # Refused, or (with a caller's credential) a fal app of that name: never the
            # admin API's answer.
            assert answer.status_code in (400, 401, 403, 404), (path, answer.text)
            assert "next_cursor" not in answer.text and "changed" not in answer.text
    assert ports.run("plain") == 200  # not blocked
    for record in fake_gateway.requests():  # the admin token never goes upstream
        assert ADMIN_TOKEN not in str(record["headers"])


@pytest.mark.parametrize(
    ("path", "caller"),
    [
        ("team/alice", "team/alice"),  # a slash in the id: the last segment is the action
        ("team%2Falice", "team/alice"),  # the same id, escaped
        (quote("ünï☃"), "ünï☃"),
        ("%252F", "%2F"),  # an escaped escape names the literal id
    ],
)
def test_a_caller_id_in_the_path_names_exactly_that_caller(
    ports: Ports, path: str, caller: str
) -> None:
    answer = ports.admin.post(f"/admin/callers/{path}/block")
    assert answer.status_code == 200, answer.text
    assert answer.json()["caller"] == caller
    try:
        assert ports.run(caller) == 403
        assert all(ports.run(other) == 200 for other in TOKENS if other != caller)
    finally:
        assert ports.admin.post(f"/admin/callers/{path}/unblock").json()["changed"] is True
    assert ports.run(caller) == 200


@pytest.mark.parametrize("size", [1_000, 10_000, 60_000])  # httpx sends at most 64 KiB
def test_a_huge_caller_id_is_a_4xx_or_handled_never_a_500(ports: Ports, size: int) -> None:
    answer = ports.admin.post(f"/admin/callers/{'x' * size}/block")
    assert answer.status_code in (200, 400, 404, 414, 431), answer.status_code
    if answer.status_code == 200:
        assert answer.json()["caller"] == "x" * size
        ports.admin.post(f"/admin/callers/{'x' * size}/unblock")
    assert ports.admin.get("/admin/callers").status_code == 200  # still serving


@pytest.mark.parametrize(
    "query",
    [
        {"cursor": "garbage"},
        {"cursor": "%%%"},
        {"cursor": "A" * 5000},
        {"cursor": encode_cursor("r", 1, "0-")},  # the other store's
        {"cursor": encode_cursor("m", 1, "-5")},
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "1e3"},
    ],
)
def test_bad_listing_input_is_400_json(ports: Ports, query: dict[str, str]) -> None:
    assert_json_error(ports.admin.get("/admin/callers", params=query), 400)


def test_bad_actions_are_4xx_json(ports: Ports) -> None:
    assert_json_error(ports.admin.get("/admin/callers/plain/block"), 405)
    assert_json_error(ports.admin.post("/admin/callers"), 405)
    assert_json_error(ports.admin.post("/admin/callers/plain/delete"), 404)
    assert_json_error(ports.admin.post("/admin/callers//block"), 400)
    assert_json_error(ports.admin.post("/admin/callers/plain/reset?period=century"), 400)
    assert_json_error(ports.admin.get("/admin"), 404)


def test_two_authorization_headers_are_refused(ports: Ports) -> None:
    headers = [("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", "Bearer x")]
    with httpx.Client(base_url=str(ports.admin.base_url), trust_env=False, timeout=10) as c:
        answer = c.post("/admin/callers/plain/block", headers=headers)
    assert_json_error(answer, 401)
    assert ports.run("plain") == 200


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"FAL_PROXY_ADMIN_TOKEN": "short-token"},
         "FAL_PROXY_ADMIN_TOKEN must be at least 16 characters"),
        ({"FAL_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "FAL_PROXY_METRICS_PORT": ""},
         "set FAL_PROXY_METRICS_PORT"),
    ],
)  # fmt: skip
def test_a_short_or_portless_token_is_refused_at_start_up(
    fake_gateway: FakeGateway, extra: dict[str, str], said: str
) -> None:
    settings = {"FAL_KEY": FAL_KEY, "FAL_PROXY_GATEWAY_URL": fake_gateway.gateway_url,
                "FAL_PROXY_METRICS_PORT": str(free_port()), **extra}  # fmt: skip
    env = child_env(**settings)
    done = subprocess.run([sys.executable, "-m", "proxy", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
    assert done.returncode == 2 and said in done.stderr + done.stdout, done
    assert "short-token" not in done.stderr + done.stdout


def test_a_redis_cursor_that_is_garbage_is_400(
    fake_gateway: FakeGateway, tmp_path: Path, own_redis: RedisServer
) -> None:
    proxy, port = launch(fake_gateway, tmp_path, FAL_PROXY_REDIS_URL=own_redis.url)
    running = Ports(proxy, port)
    try:
        assert running.run("plain") == 200
        for cursor in ["garbage", encode_cursor("m", 1, "0"),
                       encode_cursor("r", 99999, "x-y"), "A" * 5000]:  # fmt: skip
            answer = running.admin.get("/admin/callers", params={"cursor": cursor})
            if cursor == encode_cursor("r", 99999, "x-y"):  # another month: starts over
                assert answer.status_code == 200, answer.text
                continue
            assert_json_error(answer, 400)
        listed = running.admin.get("/admin/callers").json()["callers"]
        assert [row["id"] for row in listed] == ["plain"]
    finally:
        running.close()
        proxy.process.stop()
