"""A queue request is its caller's: with callers identified, another caller holding its id
cannot read its status or result, or cancel it (403 ``queue_request_refused``, never sent
upstream); ``FAL_PROXY_QUEUE_OWNER_CHECK=false`` lets any caller through, as before.

Real proxy processes in front of the emulated gateway, which records what reached it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import FakeGateway, RunningProxy, token_callers

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
SUBMIT = "https://queue.fal.run/fal-ai/fast-sdxl"
Start = Callable[..., RunningProxy]


def call(proxy: RunningProxy, who: str, method: str, target: str, **kwargs: Any) -> httpx.Response:
    headers = {"x-proxy-authorization": f"Bearer {TOKENS[who]}", "x-fal-target-url": target}
    return httpx.request(method, f"{proxy.url}/api/fal/proxy", headers=headers, timeout=10,
                         trust_env=False, **kwargs)  # fmt: skip


def submit(proxy: RunningProxy, who: str) -> dict[str, Any]:
    answer = call(proxy, who, "POST", SUBMIT, json={"prompt": "a cat"})
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def targets(job: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every call about one request: status, status stream, result, cancel."""
    return {
        "status": ("GET", job["status_url"]),
        "stream": ("GET", job["status_url"] + "/stream"),
        "result": ("GET", job["response_url"]),
        "cancel": ("PUT", job["cancel_url"]),
    }


def test_only_the_submitting_caller_reads_or_cancels_its_queue_request(
    start_proxy: Start, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    proxy = start_proxy(**token_callers(tmp_path, TOKENS))
    job = submit(proxy, "alice")
    request_id = job["request_id"]
    fake_gateway.clear()
    shouted = {  # the same request, named other ways: the id's letters cased up, a slash more
        "upper": ("GET", job["status_url"].replace(request_id, request_id.upper())),
        "slash": ("GET", job["response_url"] + "/"),
        "other app": ("GET", job["status_url"].replace("fal-ai/fast-sdxl", "fal-ai/flux")),
    }
    for name, (method, target) in {**targets(job), **shouted}.items():
        refused = call(proxy, "bob", method, target)
        assert refused.status_code == 403, (name, refused.text)
        body = refused.json()
        assert body["message"] == "queue request refused"
        assert "another caller" in body["detail"]
        line = proxy.wait_for_request_log(refused.headers["x-proxy-request-id"])
        assert (line["error"], line["caller"]) == ("queue_request_refused", "bob")
        assert "FAL_PROXY_QUEUE_OWNER_CHECK" in line["hint"]
    # Named some other way than the SDK's (a client of fal's own parsing could read them as
    # the same request): refused outright.
    odd = {
        "suffix": job["response_url"].replace(request_id, request_id + ";v=1"),
        "nested": job["status_url"].replace("/requests/", "/requests/x/requests/"),
        "cased": job["status_url"].replace("/requests/", "/REQUESTS/"),
        "braces": job["status_url"].replace(request_id, "{" + request_id + "}"),
        "no hyphens": job["status_url"].replace(request_id, request_id.replace("-", "")),
    }
    for name, target in odd.items():
        refused = call(proxy, "bob", "GET", target)
        assert refused.status_code == 400, (name, refused.text)
        assert refused.json()["message"] == "invalid queue request path"
    assert fake_gateway.requests() == []  # none of them reached the gateway

    status = call(proxy, "alice", "GET", job["status_url"])
    assert status.status_code == 200, status.text
    assert status.json()["request_id"] == request_id
    assert len(fake_gateway.requests()) == 1

    # Bob's own request is his, and an id this proxy never handed out is not refused.
    mine = submit(proxy, "bob")
    assert call(proxy, "bob", "GET", mine["status_url"]).status_code == 200
    assert call(proxy, "alice", "GET", mine["status_url"]).status_code == 403
    unknown = job["status_url"].replace(request_id, "00000000-0000-4000-8000-000000000000")
    assert call(proxy, "bob", "GET", unknown).status_code != 403
    assert fake_gateway.requests()[-1]["header_map"]["x-fal-target-url"] == unknown


def test_with_the_check_off_any_caller_holding_the_id_gets_through(
    start_proxy: Start, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    proxy = start_proxy(**token_callers(tmp_path, TOKENS), FAL_PROXY_QUEUE_OWNER_CHECK="false")
    job = submit(proxy, "alice")
    status = call(proxy, "bob", "GET", job["status_url"])
    assert status.status_code == 200, status.text
    assert status.json()["request_id"] == job["request_id"]
