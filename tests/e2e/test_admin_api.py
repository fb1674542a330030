"""The admin API on the operator's port (docs/admin.md), through real proxies.

``FAL_PROXY_ADMIN_TOKEN`` turns it on, on ``FAL_PROXY_METRICS_PORT`` only: list the month's
callers (paged), reset a caller's quotas and budgets, block and unblock a caller. A block
holds on every replica sharing a Redis at the next call: the admit script checks it in
the round trip every call makes anyway.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import FakeGateway, RunningProxy, token_callers
from tests.redis_support import RedisServer, free_port

SDXL = "/fal-ai/fast-sdxl"
LCM = "fal-ai/fast-lcm-diffusion"
ADMIN_TOKEN = "admin-SENTINEL-token-5f3e9a1c"
DEADLINE = 10.0

pytestmark = pytest.mark.usefixtures("clear_of_window_edges")


class Admin:
    """A proxy with its operator port: calls as callers, and admin requests."""

    def __init__(self, proxy: RunningProxy, metrics_port: int, tokens: dict[str, str]) -> None:
        self.proxy, self.tokens = proxy, tokens
        self.url = f"http://127.0.0.1:{metrics_port}"

    def admin(
        self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kw: Any
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(kw.pop("headers", {}))
        with httpx.Client(base_url=self.url, trust_env=False, timeout=DEADLINE) as c:
            return c.request(method, path, headers=headers, **kw)

    def run(self, caller: str) -> httpx.Response:
        with httpx.Client(base_url=self.proxy.url, trust_env=False, timeout=DEADLINE) as c:
            return c.post(SDXL, json={"prompt": "a lighthouse"}, headers=self.caller(caller))

    def caller(self, name: str) -> dict[str, str]:
        return {"x-proxy-authorization": f"Bearer {self.tokens[name]}"}


def callers(n: int) -> dict[str, str]:
    run = uuid.uuid4().hex[:8]  # ids of this test only (a shared Redis keeps the month's)
    return {f"caller-{run}-{i:02d}": f"token-{run}-{i:02d}-0123456789" for i in range(n)}


def start(
    start_proxy: Any, tmp_path: Path, tokens: dict[str, str], *, admin: bool = True,
    **extra: str,
) -> Admin:  # fmt: skip
    port = free_port()
    env = {**token_callers(tmp_path, tokens), "FAL_PROXY_METRICS_PORT": str(port), **extra}
    if admin:
        env["FAL_PROXY_ADMIN_TOKEN"] = ADMIN_TOKEN
    return Admin(start_proxy(**env), port, tokens)


def upstream_records(gateway: FakeGateway) -> list[dict[str, Any]]:
    """Everything the emulated gateway and fal received (HTTP and sockets)."""
    return list(gateway.client.get("/_emulator/requests").json())


def test_without_a_token_the_admin_paths_are_not_served(start_proxy, tmp_path: Path) -> None:
    proxy = start(start_proxy, tmp_path, callers(1), admin=False)
    for method, path in [("GET", "/admin/callers"), ("POST", "/admin/callers/x/block")]:
        assert proxy.admin(method, path).status_code == 404
    assert proxy.admin("GET", "/metrics").status_code == 200  # the port is up


def test_a_wrong_or_missing_token_is_refused_and_changes_nothing(
    start_proxy, tmp_path: Path
) -> None:
    tokens = callers(1)
    (who,) = tokens
    proxy = start(start_proxy, tmp_path, tokens)
    tries: list[dict[str, str] | None] = [
        None,
        {"authorization": "Bearer wrong-admin-token-0000000"},
        {"authorization": f"Basic {ADMIN_TOKEN}"},  # the right token, the wrong scheme
        {"authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"x-proxy-authorization": f"Bearer {ADMIN_TOKEN}"},  # a caller's header
    ]
    for headers in tries:
        for method, path in [("POST", f"/admin/callers/{who}/block"), ("GET", "/admin/callers"),
                             ("POST", "/admin/nothing-here")]:  # fmt: skip
            answer = proxy.admin(method, path, token=None, headers=headers or {})
            assert answer.status_code == 401, (headers, answer.text)
            body = answer.json()
            assert set(body) == {"message", "detail"} and "FAL_PROXY_ADMIN_TOKEN" in body["detail"]
            assert ADMIN_TOKEN not in answer.text
    assert proxy.run(who).status_code == 200  # not blocked
    listed = proxy.admin("GET", "/admin/callers").json()["callers"]
    assert [(row["id"], row["blocked"]) for row in listed] == [(who, False)]
    refusals = [r for r in proxy.proxy.logs() if r.get("event") == "admin_refused"]
    assert len(refusals) == 3 * len(tries) and all(r["level"] == "warning" for r in refusals)
    assert not any(ADMIN_TOKEN[:-1] in line for line in proxy.proxy.process.lines)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_listing_pages_through_every_caller_once(
    store: str, start_proxy, tmp_path: Path, own_redis: RedisServer
) -> None:
    tokens = callers(25)
    extra = {"FAL_PROXY_REDIS_URL": own_redis.url} if store == "redis" else {}
    proxy = start(start_proxy, tmp_path, tokens, **extra)
    for who in tokens:
        assert proxy.run(who).status_code == 200
    seen: list[dict[str, Any]] = []
    cursor, pages = None, 0
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        answer = proxy.admin("GET", "/admin/callers", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["callers"]) <= 10
        seen += body["callers"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    ids = [row["id"] for row in seen]
    assert sorted(ids) == sorted(tokens) and pages == 3, ids  # each exactly once
    for row in seen:
        assert row["generations"] == 1 and row["blocked"] is False
        assert row["apps"]["fal-ai/fast-sdxl"]["generations"] == 1
        assert row["billable_units"] == 1  # the emulator bills one unit per image
    default = proxy.admin("GET", "/admin/callers").json()
    assert len(default["callers"]) == 25 and default["next_cursor"] is None


def test_reset_gives_a_caller_at_its_quota_room_again(start_proxy, tmp_path: Path) -> None:
    tokens = callers(2)
    who, other = tokens
    proxy = start(start_proxy, tmp_path, tokens, FAL_PROXY_QUOTAS="*=1/day, *=5/month")
    assert proxy.run(who).status_code == 200
    assert proxy.run(other).status_code == 200
    assert proxy.run(who).status_code == 429
    hour = proxy.admin("POST", f"/admin/callers/{who}/reset", params={"period": "hour"})
    assert hour.status_code == 200 and hour.json()["cleared"] == 0  # no hourly quota
    assert proxy.run(who).status_code == 429
    answer = proxy.admin("POST", f"/admin/callers/{who}/reset", params={"period": "day"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["reset"] == ["*=1/day"] and answer.json()["cleared"] == 1
    assert proxy.run(who).status_code == 200
    assert proxy.run(other).status_code == 429  # another caller's count is its own
    # The usage record is what happened: reset leaves it.
    row = next(r for r in proxy.admin("GET", "/admin/callers").json()["callers"] if r["id"] == who)
    assert row["generations"] == 2
    line = next(r for r in proxy.proxy.logs() if r.get("event") == "admin_action"
                and r.get("result") == "cleared 1 of 1 counters")  # fmt: skip
    assert line["action"] == "reset" and line["caller"] == who and line["client_ip"]


def socket_status(proxy: Admin, who: str) -> int:
    url = proxy.proxy.url.replace("http://", "ws://", 1) + f"/{LCM}/realtime"

    async def handshake() -> int:
        try:
            async with connect(url, proxy=None, open_timeout=DEADLINE,
                               additional_headers=proxy.caller(who)):  # fmt: skip
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(handshake())


def realtime_token(proxy: Admin, who: str) -> httpx.Response:
    with httpx.Client(base_url=proxy.proxy.url, trust_env=False, timeout=DEADLINE) as c:
        return c.post("/api/fal/realtime-token", json={"app": f"{LCM}/realtime"},
                      headers=proxy.caller(who))  # fmt: skip


def assert_blocked(answer: httpx.Response) -> None:
    assert answer.status_code == 403, answer.text
    body = answer.json()
    assert body["message"] == "caller blocked" and "ask the operator" in body["detail"]


def test_a_block_holds_on_both_replicas_within_a_second(
    start_proxy, fake_gateway: FakeGateway, tmp_path: Path, own_redis: RedisServer
) -> None:
    tokens = callers(2)
    who, other = tokens
    a = start(start_proxy, tmp_path, tokens, FAL_PROXY_REDIS_URL=own_redis.url)
    b = start(start_proxy, tmp_path, tokens, FAL_PROXY_REDIS_URL=own_redis.url)
    assert a.run(who).status_code == 200 and b.run(who).status_code == 200
    fake_gateway.clear()

    answer = a.admin("POST", f"/admin/callers/{who}/block")
    blocked_at = time.monotonic()
    assert answer.status_code == 200 and answer.json()["changed"] is True, answer.text
    assert_blocked(a.run(who))
    # The other replica: polled until it refuses, with a deadline of one second.
    admitted_there = 0
    while True:
        there = b.run(who)
        if there.status_code == 403:
            break
        admitted_there += 1
        assert time.monotonic() - blocked_at < 1.0, "replica B still admits the blocked caller"
    assert_blocked(there)
    assert time.monotonic() - blocked_at < 1.0
    assert admitted_there == 0  # in practice: the very next call (the same Redis round trip)
    line = b.proxy.wait_for_request_log(there.headers["x-proxy-request-id"])
    assert line["error"] == "caller_blocked"
    # Every way in is refused, on both replicas; another caller is not.
    assert socket_status(b, who) == 403 and socket_status(a, who) == 403
    assert_blocked(realtime_token(b, who))
    assert upstream_records(fake_gateway) == []  # nothing of the blocked caller went upstream
    assert b.run(other).status_code == 200
    listed = {r["id"]: r["blocked"] for r in b.admin("GET", "/admin/callers").json()["callers"]}
    assert listed == {who: True, other: False}

    assert a.admin("POST", f"/admin/callers/{who}/block").json()["changed"] is False
    unblock = b.admin("POST", f"/admin/callers/{who}/unblock")
    assert unblock.status_code == 200 and unblock.json() == {
        "caller": who, "action": "unblock", "blocked": False, "changed": True}  # fmt: skip
    assert a.run(who).status_code == 200 and b.run(who).status_code == 200
    assert socket_status(a, who) == 101
    actions = [(r["action"], r["result"]) for r in [*a.proxy.logs(), *b.proxy.logs()]
               if r.get("event") == "admin_action"]  # fmt: skip
    assert sorted(actions) == [("block", "blocked"), ("block", "unchanged"),
                               ("unblock", "unblocked")]  # fmt: skip
    for proxy in (a, b):
        assert not any(ADMIN_TOKEN in line for line in proxy.proxy.process.lines)


def test_a_block_in_memory(start_proxy, fake_gateway: FakeGateway, tmp_path: Path) -> None:
    tokens = callers(1)
    (who,) = tokens
    proxy = start(start_proxy, tmp_path, tokens)
    assert proxy.admin("POST", f"/admin/callers/{who}/block").status_code == 200
    fake_gateway.clear()
    assert_blocked(proxy.run(who))
    assert socket_status(proxy, who) == 403
    assert_blocked(realtime_token(proxy, who))
    with httpx.Client(base_url=proxy.proxy.url, trust_env=False, timeout=DEADLINE) as c:
        assert_blocked(c.get("/api/fal/usage", headers=proxy.caller(who)))
    assert upstream_records(fake_gateway) == []
    assert proxy.admin("POST", f"/admin/callers/{who}/unblock").json()["changed"] is True
    assert proxy.run(who).status_code == 200
