"""Request policy per plan, end to end: what a plan's callers may ask fal for, as the gateway
receives it. A real proxy (token callers, a plans file) in front of the emulated gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FakeGateway, RunningProxy, token_callers

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
SUBMIT = "https://queue.fal.run/fal-ai/flux/dev?fal_webhook=https%3A%2F%2Fexample.com%2Fh%3Fa%3Db"
PLANS = """
[plans]
free = ""
pro = ""

[callers]
alice = "free"
bob = "pro"

[requests.free]
queue_priority = "low"
runner_hint = "strip"
object_expiration_max_seconds = 3600
request_start_timeout_max_seconds = 30
max_queue_length = 10
"""


@pytest.fixture
def plan_proxy(start_proxy, tmp_path: Path) -> RunningProxy:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS, encoding="utf-8")
    return start_proxy(
        **token_callers(tmp_path, TOKENS), FAL_PROXY_PLANS_FILE=str(plans), FAL_PROXY_QUOTAS=""
    )


def send(
    proxy: RunningProxy, caller: str, headers: list[tuple[str, str]], path: str = "/api/fal/proxy"
) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        r = c.post(
            path,
            content=b'{"prompt":"a lighthouse"}',
            headers=[
                ("content-type", "application/json"),
                ("x-proxy-authorization", f"Bearer {TOKENS[caller]}"),
                *headers,
            ],
        )
    assert r.status_code == 200, r.text
    return r


def received(gateway: FakeGateway, name: str) -> list[str]:
    """Every value of header ``name`` the gateway got on the one request it saw."""
    seen: dict[str, Any] = gateway.only_request()
    return [v for n, v in seen["headers"] if n.lower() == name]


@pytest.mark.parametrize(
    "sent",
    [
        [("x-fal-queue-priority", "normal")],
        [("X-Fal-Queue-Priority", "HIGH")],
        [("x-fal-queue-priority", "normal"), ("x-fal-queue-priority", "normal")],
        [("x-fal-queue-priority", "low"), ("X-FAL-QUEUE-PRIORITY", "normal")],
        [],
    ],
)
def test_a_free_caller_reaches_fal_with_low_priority_whatever_it_sent(
    plan_proxy: RunningProxy, fake_gateway: FakeGateway, sent: list[tuple[str, str]]
) -> None:
    r = send(plan_proxy, "alice", [("x-fal-target-url", SUBMIT), *sent])
    assert received(fake_gateway, "x-fal-queue-priority") == ["low"]
    line = plan_proxy.lines_of([r])[0]
    assert line["caller"] == "alice"
    assert "queue_priority" in line["request_policy"]


def test_a_free_callers_submit_is_capped_everywhere(
    plan_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    lifecycle = {"expiration_duration_seconds": 86400 * 365, "initial_acl": {"default": "forbid"}}
    r = send(
        plan_proxy,
        "alice",
        [
            ("x-fal-target-url", SUBMIT + "&fal_max_queue_length=500"),
            ("x-fal-runner-hint", "vip-pool"),
            ("x-fal-request-timeout", "600"),
            ("x-fal-object-lifecycle-preference", json.dumps(lifecycle)),
            ("x-custom", "kept"),
        ],
    )
    seen = fake_gateway.only_request()
    assert seen["target_url"] == SUBMIT + "&fal_max_queue_length=10"
    assert received(fake_gateway, "x-fal-runner-hint") == []
    assert received(fake_gateway, "x-fal-request-timeout") == ["30"]
    assert received(fake_gateway, "x-fal-request-start-timeout") == ["30"]
    assert [json.loads(v) for v in received(fake_gateway, "x-fal-object-lifecycle-preference")] == [
        {"expiration_duration_seconds": 3600, "initial_acl": {"default": "forbid"}}
    ]
    assert received(fake_gateway, "x-custom") == ["kept"]
    line = plan_proxy.lines_of([r])[0]
    assert set(line["request_policy"]) == {
        "queue_priority",  # none sent: low added
        "runner_hint",
        "request_start_timeout_max_seconds",
        "object_expiration_max_seconds",
        "max_queue_length",
    }
    assert "86400" not in json.dumps(line)  # names in the log line, never values


def test_a_free_callers_run_gets_the_caps_but_keeps_its_query(
    plan_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    send(
        plan_proxy,
        "alice",
        [("X-Fal-Request-Start-Timeout", "12.5"), ("x-fal-object-lifecycle-preference", "{oops")],
        path="/fal-ai/fast-sdxl?seed=1",
    )
    seen = fake_gateway.only_request()
    assert (seen["path"].rsplit("/fal/", 1)[1], seen["query"]) == ("fal-ai/fast-sdxl", "seed=1")
    assert received(fake_gateway, "x-fal-request-timeout") == ["12.5"]
    assert received(fake_gateway, "x-fal-request-start-timeout") == ["12.5"]
    assert received(fake_gateway, "x-fal-object-lifecycle-preference") == [
        '{"expiration_duration_seconds":3600}'
    ]


def test_a_pro_callers_values_pass_through(
    plan_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    lifecycle = '{"expiration_duration_seconds": 31536000}'
    r = send(
        plan_proxy,
        "bob",
        [
            ("x-fal-target-url", SUBMIT + "&fal_max_queue_length=500"),
            ("x-fal-queue-priority", "normal"),
            ("x-fal-runner-hint", "vip-pool"),
            ("x-fal-request-timeout", "600"),
            ("x-fal-object-lifecycle-preference", lifecycle),
        ],
    )
    assert fake_gateway.only_request()["target_url"] == SUBMIT + "&fal_max_queue_length=500"
    assert received(fake_gateway, "x-fal-queue-priority") == ["normal"]
    assert received(fake_gateway, "x-fal-runner-hint") == ["vip-pool"]
    assert received(fake_gateway, "x-fal-request-timeout") == ["600"]
    assert received(fake_gateway, "x-fal-request-start-timeout") == []
    assert received(fake_gateway, "x-fal-object-lifecycle-preference") == [lifecycle]
    assert "request_policy" not in plan_proxy.lines_of([r])[0]


def test_reading_a_free_callers_status_is_left_alone(
    plan_proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    submit = send(plan_proxy, "alice", [("x-fal-target-url", SUBMIT)])
    status = f"https://queue.fal.run/fal-ai/flux/requests/{submit.json()['request_id']}/status"
    fake_gateway.clear()
    with httpx.Client(base_url=plan_proxy.url, trust_env=False, timeout=20) as c:
        r = c.get(
            "/api/fal/proxy",
            headers={
                "x-proxy-authorization": f"Bearer {TOKENS['alice']}",
                "x-fal-target-url": status,
                "x-fal-queue-priority": "normal",
            },
        )
    assert r.status_code == 200, r.text
    assert fake_gateway.only_request()["target_url"] == status
    assert received(fake_gateway, "x-fal-queue-priority") == ["normal"]
    assert received(fake_gateway, "x-fal-request-timeout") == []
